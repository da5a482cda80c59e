"""Tasks of your own (a task YAML file or a folder of them in ``--tasks``), an unreachable Hub, and the harness's log
kept out of ``mlkv eval``'s output (CPU, offline, a tiny random model)."""

import argparse
import json
import logging
import os
import textwrap
import warnings

import pytest

from mlkv.data.paths import default_data_dir
from mlkv.errors import UsageError
from mlkv.evaluation import harness_log, task_selection, tasks
from mlkv.evaluation.command import CUSTOM_TASK_EXAMPLE, add_eval_arguments, run_eval_command

DATA = default_data_dir()
if not (DATA / "eval").is_dir() or not (DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json").is_file():
    pytest.skip(f"shared data folder not found ({DATA}); set MLKV_DATA", allow_module_level=True)

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

CAPITALS = [
    {"country": "France", "choices": ["Paris", "Lyon"], "answer": 0},
    {"country": "Italy", "choices": ["Milan", "Rome", "Turin"], "answer": 1},
    {"country": "Japan", "choices": ["Osaka", "Kyoto", "Tokyo"], "answer": 2},
    {"country": "Peru", "choices": ["Lima", "Cusco"], "answer": 0},
    {"country": "Kenya", "choices": ["Mombasa", "Nairobi"], "answer": 1},
]


def _args(*argv):
    return add_eval_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv])


def _documented_yaml(data_file) -> str:
    """The task YAML that ``mlkv eval --help`` shows, reading ``data_file``."""
    lines = CUSTOM_TASK_EXAMPLE.split("capitals.yaml:\n", 1)[1].split("\nthen:", 1)[0]
    return textwrap.dedent(lines).replace("/data/capitals.jsonl", str(data_file)) + "\n"


@pytest.fixture()
def capitals_yaml(tmp_path):
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in CAPITALS))
    path = tmp_path / "tasks" / "capitals.yaml"
    path.parent.mkdir()
    path.write_text(_documented_yaml(data))
    return path


def _expected_accuracy(model, tok) -> float:
    """The documented task's accuracy from the harness's own ``HFLM`` log-likelihoods of each choice."""
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=4)
    correct = 0
    for doc in CAPITALS:
        context = f"Q: What is the capital of {doc['country']}?\nA:"
        requests = [Instance("loglikelihood", doc, (context, f" {c}"), i) for i, c in enumerate(doc["choices"])]
        scores = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        correct += scores.index(max(scores)) == doc["answer"]
    return correct / len(CAPITALS)


def test_the_documented_task_yaml_runs_on_a_local_jsonl_beside_a_shipped_task(tiny_dir, tiny, capitals_yaml, tmp_path,
                                                                                capsys):
    output = tmp_path / "results.json"
    code = run_eval_command(_args(tiny_dir, "--tasks", capitals_yaml, "piqa", "--limit", 5, "--device", "cpu",
                                  "--data-dir", DATA, "--output", output))
    out = capsys.readouterr().out
    assert code == 0
    saved = json.loads(output.read_text())
    assert set(saved["results"]) == {"capitals", "piqa"}
    assert saved["n-samples"]["capitals"]["effective"] == len(CAPITALS)
    assert saved["results"]["capitals"]["acc,none"] == pytest.approx(_expected_accuracy(*tiny))
    assert saved["mlkv"]["tasks"] == ["capitals", "piqa"]
    assert saved["mlkv"]["task_yamls"] == {"capitals": str(capitals_yaml.resolve())}
    assert "| capitals | acc |" in out


def test_a_folder_runs_every_task_it_defines_and_include_path_makes_its_names_known(tiny, tmp_path):
    model, tok = tiny
    folder = tmp_path / "mine"
    folder.mkdir()
    per_task = ("task:", "dataset_kwargs:", "  data_files:")  # the documented YAML less these is a shared base
    (folder / "_base.yaml.inc").write_text("".join(
        f"{line}\n" for line in _documented_yaml("-").splitlines() if not line.startswith(per_task)))
    for name, docs in (("first_three", CAPITALS[:3]), ("last_two", CAPITALS[3:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        (folder / f"{name}.yaml").write_text(f"include: _base.yaml.inc\ntask: {name}\n"
                                             f"dataset_kwargs: {{data_files: {{test: {tmp_path / name}.jsonl}}}}\n")
    both = tasks.run_tasks(model, [str(folder)], tokenizer=tok, bootstrap_iters=0)
    assert both["mlkv"]["tasks"] == ["first_three", "last_two"] and both["mlkv"]["include_path"] == [str(folder)]
    assert both["n-samples"]["first_three"]["effective"] == 3 and both["n-samples"]["last_two"]["effective"] == 2
    overall = (3 * both["results"]["first_three"]["acc,none"] + 2 * both["results"]["last_two"]["acc,none"]) / 5
    assert overall == pytest.approx(_expected_accuracy(model, tok))
    one = tasks.run_tasks(model, ["last_two"], tokenizer=tok, bootstrap_iters=0, include_path=[folder])
    assert set(one["results"]) == {"last_two"}
    assert one["results"]["last_two"] == both["results"]["last_two"]


def test_unknown_and_malformed_tasks_are_named_with_what_exists(capitals_yaml, tmp_path):
    with pytest.raises(tasks.UnknownTaskError, match=r"unknown task\(s\): capitols\. Supported with local data: "
                                                     r"lambada_openai.*; from your task YAMLs: capitals"):
        tasks.select_tasks(["capitols", str(capitals_yaml.parent)])
    assert tasks.check_tasks([str(capitals_yaml.parent), "piqa"]) == ["capitals", "piqa"]
    with pytest.raises(UsageError, match=r"task YAML file not found: .*nope\.yaml"):
        tasks.select_tasks([str(tmp_path / "nope.yaml")])
    with pytest.raises(UsageError, match=r"no such task YAML file or folder: .*missing"):
        tasks.select_tasks([str(tmp_path / "missing") + "/"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\noutput_type: multiple_choice\n")
    with pytest.raises(UsageError, match=r"bad\.yaml defines no task: a task YAML needs a 'task: NAME'"):
        tasks.select_tasks([str(bad)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"no task YAML under .*empty"):
        tasks.select_tasks([str(empty)])


def test_the_request_cache_refuses_your_own_tasks(capitals_yaml, tmp_path):
    with pytest.raises(UsageError, match="request cache is for mlkv's shipped tasks.*capitals"):
        tasks.build_request_cache([str(capitals_yaml)], tmp_path / "cache")


# ---- an unreachable Hub ---------------------------------------------------------------------------------------------
def _hub_without_network(monkeypatch):
    """The harness's real hub PIQA task (its own YAML, dataset ``baber/piqa``) whose download fails as ``datasets``
    fails without a network; the full hub index is not built (it takes seconds)."""
    import datasets

    builtin = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "piqa")
    monkeypatch.setattr(task_selection, "task_manager", lambda data_source="local", data_dir=None, include_path=():
                        TaskManager(include_path=[builtin, *map(str, include_path)], include_defaults=False))

    def offline(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)


def test_an_unreachable_hub_is_a_named_error_that_points_to_the_local_data(tiny_dir, tiny, monkeypatch, capsys):
    _hub_without_network(monkeypatch)
    model, tok = tiny
    with pytest.raises(tasks.HubUnreachableError, match=r"the Hugging Face Hub is unreachable \(Couldn't reach "
                                                        r"'baber/piqa'.*\); use the local copies of the task data: "
                                                        r"--data-source local"):
        tasks.run_tasks(model, ["piqa"], limit=2, tokenizer=tok, data_source="hub")
    assert run_eval_command(_args(tiny_dir, "--tasks", "piqa", "--limit", 2, "--data-source", "hub",
                                  "--device", "cpu")) == 2
    err = capsys.readouterr().err
    assert "mlkv eval: error: the Hugging Face Hub is unreachable" in err and "--data-source local" in err
    assert "Traceback" not in err


def test_your_own_task_reading_the_hub_offline_is_told_to_read_local_files(tiny, tmp_path, monkeypatch):
    _hub_without_network(monkeypatch)
    model, tok = tiny
    path = tmp_path / "remote.yaml"
    path.write_text("task: remote\ndataset_path: someone/remote\ntest_split: test\noutput_type: multiple_choice\n"
                    "doc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: answer\n")
    with pytest.raises(tasks.HubUnreachableError, match=r"someone/remote.*dataset_path: json with dataset_kwargs"):
        tasks.run_tasks(model, [str(path)], limit=2, tokenizer=tok)


# ---- the harness's log ----------------------------------------------------------------------------------------------
def test_the_harness_log_stays_out_of_eval_output_unless_its_level_is_set(tiny, caplog, monkeypatch):
    model, tok = tiny
    caplog.set_level(logging.DEBUG)
    tasks.run_tasks(model, ["piqa"], limit=1, tokenizer=tok, bootstrap_iters=0)
    assert not [r for r in caplog.records if r.name.startswith("lm_eval")], "the harness's log leaked"
    assert logging.getLogger("lm_eval").level == logging.NOTSET  # put back
    caplog.clear()
    monkeypatch.setenv(harness_log.LEVEL_ENV, "warning")
    tasks.run_tasks(model, ["piqa"], limit=1, tokenizer=tok, bootstrap_iters=0)
    routed = [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")]
    assert any("Please do not launch via accelerate" in m for m in routed)
    assert all(r.levelno >= logging.WARNING for r in caplog.records if r.name.startswith("lm_eval"))


def test_quiet_harness_ignores_the_harness_warnings_only():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with harness_log.quiet_harness():
            warnings.warn_explicit("from the harness", UserWarning, "task.py", 1, module="lm_eval.api.task")
            warnings.warn_explicit("from elsewhere", UserWarning, "x.py", 1, module="mlkv.x")
    assert [str(w.message) for w in seen] == ["from elsewhere"]


def test_eval_help_shows_a_task_of_your_own_and_keeps_the_parser_epilog():
    parser = add_eval_arguments(argparse.ArgumentParser(prog="mlkv eval", epilog="examples:\n  mlkv eval runs/x"))
    text = parser.format_help()
    assert "examples:\n  mlkv eval runs/x" in text
    assert "  task: capitals\n  dataset_path: json\n" in text and "--tasks capitals.yaml piqa" in text
    assert "whole books" in text and "document-level" in text  # what --limit and --max-tokens count
