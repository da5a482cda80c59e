"""Your own task YAMLs, checked before the model loads (mlkv.evaluation.task_checks): each mistake is one line
naming the YAML file, the task and the key; ``--include-path DIR --tasks NAME`` as lm_eval users type it."""

import json

import pytest

import mlkv.evaluation.command
from tiny import CAPITALS_TASK
from mlkv.data.paths import default_data_dir
from mlkv.evaluation.task_checks import TaskYamlError, check_user_tasks
from mlkv.evaluation.task_selection import select_tasks

DATA = default_data_dir()
if not (DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json").is_file():
    pytest.skip(f"shared data folder not found ({DATA}); set MLKV_DATA", allow_module_level=True)
pytest.importorskip("lm_eval")

DOCS = [{"country": "France", "choices": ["Paris", "Lyon"], "answer": 0},
        {"country": "Italy", "choices": ["Milan", "Rome"], "answer": 1}]
TASK = CAPITALS_TASK


@pytest.fixture()
def task_yaml(tmp_path):
    """``task_yaml(name, old=new, ...)``: the capitals task YAML in ``tmp_path/tasks/NAME.yaml`` with each ``old``
    text replaced by ``new``, reading ``tmp_path/capitals.jsonl``."""
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tmp_path / "tasks").mkdir()

    def make(name: str = "capitals", **replace) -> str:
        text = TASK.format(data=data)
        for old, new in replace.items():
            text = text.replace(old, new)
        path = tmp_path / "tasks" / f"{name}.yaml"
        path.write_text(text)
        return str(path)

    return make


def check(items, **kw) -> None:
    check_user_tasks(select_tasks(items, **kw))


@pytest.fixture()
def model_never_loads(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the task YAMLs were checked")

    monkeypatch.setattr(mlkv.evaluation.command, "load_model", load_model)


@pytest.mark.parametrize("replace, message", [
    ({"doc_to_choice": "doc_to_choise"},
     "task capitals: doc_to_choise: not a key of lm-eval's task format (did you mean doc_to_choice?)"),
    ({"doc_to_target: answer": 'doc_to_target: "{{gld}}"'},
     "task capitals: doc_to_target: the template names gld, which the documents do not have (fields: answer, "
     "choices, country)"),
    ({"doc_to_choice: choices": "doc_to_choice: choics"},
     "task capitals: doc_to_choice: 'choics' is not a field of the documents (fields: answer, choices, country); "
     "give a field holding the choices, a list or a template"),
    ({"capitals.jsonl": "nothere.jsonl"}, "task capitals: dataset_kwargs.data_files.test: "),
], ids=["misspelled-key", "template-field", "choice-field", "missing-data-file"])
def test_a_bad_task_yaml_is_one_line_naming_the_file_task_and_key_before_the_model_loads(
        replace, message, task_yaml, tiny_dir, refused, model_never_loads):
    path = task_yaml(**replace)
    line = refused(["eval", tiny_dir, "--tasks", path, "--limit", 1, "--device", "cpu"], f"{path}: {message}")
    if "nothere" in str(replace):
        assert "nothere.jsonl not found (a relative path starts from the working directory" in line


def test_include_path_with_a_task_name_runs_the_task_as_lm_eval_does(task_yaml, tiny_dir, tmp_path, capsys):
    from mlkv.cli import main

    task_yaml()
    output = tmp_path / "results.json"
    assert main(["eval", str(tiny_dir), "--include-path", str(tmp_path / "tasks"), "--tasks", "capitals",
                 "--limit", "2", "--device", "cpu", "--output", str(output)]) == 0
    saved = json.loads(output.read_text())
    assert saved["n-samples"]["capitals"]["effective"] == 2
    assert saved["mlkv"]["include_path"] == [str(tmp_path / "tasks")]
    capsys.readouterr()
    assert main(["eval", str(tiny_dir), "--include_path", str(tmp_path / "tasks")]) == 2  # lm_eval's spelling
    assert "--include-path names folders of task YAMLs: give the tasks to run from them with --tasks" in \
        capsys.readouterr().err


def test_tasks_of_an_include_path_or_a_folder_are_checked_too(task_yaml, tmp_path, tiny_dir, refused,
                                                              model_never_loads):
    path = task_yaml("misspelled", doc_to_text="doc_to_txt")
    refused(["eval", tiny_dir, "--include-path", tmp_path / "tasks", "--tasks", "capitals"],
            f"{path}: task capitals: doc_to_txt: not a key of lm-eval's task format (did you mean doc_to_text?)")
    with pytest.raises(TaskYamlError, match=r"misspelled\.yaml: task capitals: doc_to_txt"):
        check([str(tmp_path / "tasks")])


def test_a_group_yaml_checks_its_own_keys_and_its_members(task_yaml, tmp_path):
    task_yaml(**{"capitals.jsonl": "gone.jsonl"})
    group = tmp_path / "tasks" / "geo.yaml"
    group.write_text("group: geo\ntask: [capitals]\naggregate_metric_list: [{metric: acc}]\n")
    with pytest.raises(TaskYamlError, match=r"tasks/capitals\.yaml: task capitals: dataset_kwargs\.data_files\.test: "
                                            r".*gone\.jsonl not found"):
        check(["geo"], include_path=[tmp_path / "tasks"])
    group.write_text("group: geo\ntask: [capitals]\naggregate_metrics: [{metric: acc}]\n")
    with pytest.raises(TaskYamlError, match=r"geo\.yaml: task geo: aggregate_metrics: not a key .*did you mean "
                                            r"aggregate_metric_list\?"):
        check(["geo"], include_path=[tmp_path / "tasks"])


def test_valid_yamls_and_documents_made_in_code_pass(task_yaml, tmp_path):
    """Not refused: a template with a filter, keys from an include, documents made in code (whose fields are left
    to the harness), a single data file as the train split, a JSON document over several lines."""
    base = tmp_path / "tasks" / "_base.yaml.inc"
    base.write_text("output_type: multiple_choice\nmetric_list: [{metric: acc}]\n")
    check([task_yaml("a", **{"doc_to_choice: choices": 'doc_to_choice: "{{choices|list}}"',
                             "doc_to_text: ": "include: _base.yaml.inc\ndoc_to_text: "})])
    check([task_yaml("b", **{"doc_to_text: ": "process_docs: !function utils.process\ndoc_to_text: ",
                             "doc_to_target: answer": "doc_to_target: '{{made_in_code}}'"})])
    single = tmp_path / "single.json"
    single.write_text(json.dumps(DOCS, indent=2))
    check([task_yaml("c", **{f"{{test: {tmp_path / 'capitals.jsonl'}}}": str(single), "test_split: test":
                             "test_split: train"})])
    with pytest.raises(TaskYamlError, match=r"c\.yaml: task capitals: test_split: 'test' is not a split of "
                                            r"dataset_kwargs\.data_files: a single file or list is the split 'train'"):
        check([task_yaml("c", **{f"{{test: {tmp_path / 'capitals.jsonl'}}}": str(single)})])
