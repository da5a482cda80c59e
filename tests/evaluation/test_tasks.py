"""Zero-shot tasks (``mlkv.evaluation.tasks``): our task copies build exactly the harness's requests, and the real
harness runs on a tiny model (CPU, offline, real shared data files)."""

import json
import os

import datasets
import pytest
import torch

from mlkv.data.paths import default_data_dir
from mlkv.evaluation import tasks
from mlkv.evaluation.results import RESULTS_FILE, compare, compare_rows, markdown_table, save_results
from mlkv.evaluation.task_configs import TASK_FILES, converters

DATA = default_data_dir()
if not (DATA / "eval").is_dir() or not (DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json").is_file():
    pytest.skip(f"shared data folder not found ({DATA}); set MLKV_DATA", allow_module_level=True)

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

LM_EVAL_TASKS = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
ZERO_SHOT_TASKS = ["lambada_openai", "piqa", "arc_easy", "sciq", "hellaswag", "boolq", "openbookqa"]


def _builtin_instances(yaml_path, hub_docs, split, limit):
    """Requests of the harness's built-in task (its own YAML and functions) over hand-built hub-schema docs."""
    cfg = load_yaml(os.path.join(LM_EVAL_TASKS, yaml_path), resolve_func=True)
    for key in ("dataset_path", "dataset_name", "tag"):
        cfg.pop(key, None)
    for key in ("training_split", "validation_split", "test_split"):
        if cfg.get(key) != split:
            cfg[key] = None
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({split: datasets.Dataset.from_list(hub_docs)})
    task = ConfigurableTask(config=cfg)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(inst.doc_id, inst.idx, inst.args) for inst in task.instances]


def _our_instances(name, limit):
    task = tasks.task_manager("local", DATA).load([name])["tasks"][name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(inst.doc_id, inst.idx, inst.args) for inst in task.instances]


def test_lambada_requests_equal_builtin():
    # The hub's EleutherAI/lambada_openai test split is {"text": ...} per line of the same file.
    with open(DATA / "eval/lambada_openai/lambada_test.jsonl", encoding="utf-8") as f:
        hub_docs = [{"text": json.loads(line)["text"]} for line in f]
    ours = _our_instances("lambada_openai", limit=200)
    assert ours == _builtin_instances("lambada/lambada_openai.yaml", hub_docs, "test", limit=200)
    # and the strings are what lambada_openai.yaml's templates say
    text = hub_docs[0]["text"]
    assert ours[0][2] == (" ".join(text.split(" ")[:-1]), " " + text.split(" ")[-1])


def test_piqa_requests_equal_builtin():
    # The hub's baber/piqa validation split: the official valid.jsonl fields plus the label from valid-labels.lst.
    with open(DATA / "eval/piqa/valid.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    labels = (DATA / "eval/piqa/valid-labels.lst").read_text().split()
    hub_docs = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
                for r, y in zip(rows, labels)]
    ours = _our_instances("piqa", limit=200)
    assert ours == _builtin_instances("piqa/piqa.yaml", hub_docs, "validation", limit=200)
    assert ours[0][2] == (f"Question: {rows[0]['goal']}\nAnswer:", " " + rows[0]["sol1"])


def test_first_documents_equal_builtin():
    """The first document of the other tasks, typed in the hub schema, gives the same requests as ours."""
    arc_choices = ["Sunlight is the source of energy for nearly all ecosystems.",
                   "Most ecosystems are found on land instead of in water.",
                   "Carbon dioxide is more available than other gases.",
                   "The producers in all ecosystems are plants."]
    arc = {"id": "Mercury_417466",
           "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
           "choices": {"text": arc_choices, "label": ["A", "B", "C", "D"]}, "answerKey": "A"}
    hellaswag = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
                 "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
                 "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                             "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                 "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"}
    obqa = {"id": "8-343", "question_stem": "A person wants to start saving money so that they can afford a nice "
            "vacation at the end of the year. After looking over their budget and expenses, they decide the best "
            "way to save money is to",
            "choices": {"text": ["make more phone calls", "quit eating lunch out", "buy less with monopoly money",
                                 "have lunch with friends"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"}
    with open(DATA / "eval/sciq/sciq_test.jsonl", encoding="utf-8") as f:
        sciq = json.loads(f.readline())  # published schema already
    with open(DATA / "eval/boolq/boolq_dev.llmfoundry.jsonl", encoding="utf-8") as f:
        passage = json.loads(f.readline())["query"].split("\n")[0].removeprefix("Passage: ")
    boolq = {"question": "does ethanol take more energy make that produces", "passage": passage, "idx": 0, "label": 0}
    cases = [("arc_easy", "arc/arc_easy.yaml", arc, "test"),
             ("hellaswag", "hellaswag/hellaswag.yaml", hellaswag, "validation"),
             ("openbookqa", "openbookqa/openbookqa.yaml", obqa, "test"),
             ("sciq", "sciq/sciq.yaml", sciq, "test"),
             ("boolq", "super_glue/boolq/default.yaml", boolq, "validation")]
    for name, yaml_path, hub_doc, split in cases:
        assert _our_instances(name, limit=1) == _builtin_instances(yaml_path, [hub_doc], split, limit=1), name
    assert _our_instances("hellaswag", limit=1)[0][2][0] == "Roof shingle removal: A man is sitting on a roof. He"


@pytest.mark.slow
def test_run_tasks_limit_20(tiny_dir, tmp_path):
    results = tasks.run_tasks(tiny_dir, ZERO_SHOT_TASKS, limit=20, batch_size=8, device="cpu")
    assert set(results["results"]) == set(ZERO_SHOT_TASKS)
    for task in ZERO_SHOT_TASKS:
        assert results["n-samples"][task]["effective"] == 20
        assert 0.0 <= results["results"][task]["acc,none"] <= 1.0
    assert results["results"]["lambada_openai"]["perplexity,none"] > 1.0
    for task in ("piqa", "arc_easy", "sciq", "hellaswag", "openbookqa"):
        assert 0.0 <= results["results"][task]["acc_norm,none"] <= 1.0
    info = results["mlkv"]
    assert info["kv_cache"]["bytes_per_token"] == 2 * 2 * 4 * 8 * 2 and info["limit"] == 20
    assert info["data_source"] == "local" and info["tasks"] == ZERO_SHOT_TASKS

    table = markdown_table(results)
    for task in ZERO_SHOT_TASKS:
        assert f"| {task} | acc |" in table
    path = save_results(results, tmp_path / "run" / RESULTS_FILE)
    assert json.loads(path.read_text())["results"]["piqa"]["acc,none"] == results["results"]["piqa"]["acc,none"]
    assert not [p for p in path.parent.iterdir() if p.name != RESULTS_FILE]  # no temp file left
    rows = compare_rows([path.parent, path])
    assert rows[0]["piqa_acc"] == results["results"]["piqa"]["acc,none"] and rows[0]["kv_bytes_per_token"] == 256
    assert rows[0]["hellaswag_acc_norm"] == results["results"]["hellaswag"]["acc_norm,none"]
    expected_avg = sum(results["results"][t]["acc,none"] for t in tasks.PAPER_TASKS) / 4
    assert rows[0]["avg_of_4"] == pytest.approx(expected_avg)
    text = compare([path.parent])
    assert text.splitlines()[0] == ("| config | KV bytes/token | ARC-e acc | LAMBADA acc (ppl) | PIQA acc | SciQ acc "
                                    "| HellaSwag acc_norm | avg of 4 (acc) |")
    lambada = results["results"]["lambada_openai"]
    assert f"{100 * lambada['acc,none']:.2f} ({lambada['perplexity,none']:.1f})" in text


@pytest.mark.slow
def test_request_cache_gives_the_same_results_without_rebuilding(tiny, tmp_path, monkeypatch):
    """Full-set evaluations share the harness's built requests through ``request_cache``: the second evaluation
    builds nothing and scores the same; the cache folder's name follows the task data files."""
    model, tok = tiny
    cache = tmp_path / "requests"
    kwargs = dict(batch_size=64, tokenizer=tok, bootstrap_iters=0)
    plain = tasks.run_tasks(model, ["openbookqa"], **kwargs)  # 500 questions: the whole set
    built = tasks.build_request_cache(["openbookqa"], cache)
    assert plain["mlkv"]["request_cache"] is None and [p.name for p in cache.iterdir()] == [built.name]
    assert len(list(built.iterdir())) == 1
    constructed = []
    real = ConfigurableTask.construct_requests
    monkeypatch.setattr(ConfigurableTask, "construct_requests",
                        lambda self, *a, **k: constructed.append(1) or real(self, *a, **k))
    cached = tasks.run_tasks(model, ["openbookqa"], request_cache=cache, **kwargs)
    assert not constructed, "the requests were built again"
    assert cached["mlkv"]["request_cache"] == str(built)
    import lm_eval.caching.cache
    assert lm_eval.caching.cache.PATH != str(built)  # the harness's global folder is put back
    assert cached["results"]["openbookqa"] == plain["results"]["openbookqa"]
    limited = tasks.run_tasks(model, ["openbookqa"], limit=5, request_cache=cache, **kwargs)
    assert limited["mlkv"]["request_cache"] is None and len(constructed) == 5  # --limit: no cache, 5 built

    copy = tmp_path / "data"
    (copy / "eval" / "openbookqa").mkdir(parents=True)
    rel = TASK_FILES["openbookqa"][0]
    (copy / rel).write_bytes((DATA / rel).read_bytes())
    first = tasks.request_cache_dir(cache, ["openbookqa"], copy)
    assert first != built  # another data folder
    with open(copy / rel, "a") as f:
        f.write("\n")
    assert tasks.request_cache_dir(cache, ["openbookqa"], copy) != first  # the file changed


def test_mlkv_checkpoint_through_harness(tmp_path, pythia_tokenizer):
    """An MLKV checkpoint loads through AutoModelForCausalLM and reports its shared KV cache."""
    from mlkv import MLKVForCausalLM, preset_config

    torch.manual_seed(0)
    config = preset_config("tiny-neox", plan="mlkv-2", vocab_size=50304)
    MLKVForCausalLM(config).save_pretrained(tmp_path)
    pythia_tokenizer.save_pretrained(tmp_path)
    results = tasks.run_tasks(tmp_path, ["piqa"], limit=4, batch_size=4, device="cpu")
    assert results["mlkv"]["model_type"] == "mlkv"
    assert results["mlkv"]["kv_cache"]["kv_layers"] == 2
    assert results["mlkv"]["kv_cache"]["bytes_per_token"] == config.kv_bytes_per_token()
    assert results["n-samples"]["piqa"]["effective"] == 4


def test_converted_mha_gives_the_same_loglikelihoods_as_hf_through_the_harness(tiny_dir, tmp_path):
    """The harness's own ``hf`` backend (HFLM, loading by path) scores the same requests on the transformers model
    and on its MHA conversion: log-likelihoods agree to 1e-4."""
    from mlkv.model.convert import convert_checkpoint

    dst = convert_checkpoint(tiny_dir, tmp_path / "mlkv", plan="mha")
    docs = converters.read_piqa(DATA)[:6]
    requests = []
    for i, doc in enumerate(docs):
        for sol in (doc["sol1"], doc["sol2"]):
            requests.append(Instance("loglikelihood", doc, (f"Question: {doc['goal']}\nAnswer:", f" {sol}"), i))
    scores = []
    for path in (tiny_dir, dst):
        lm = HFLM(pretrained=str(path), backend="causal", device="cpu", batch_size=4, dtype="float32")
        scores.append([ll for ll, _ in lm.loglikelihood(requests)])
    assert type(HFLM(pretrained=str(dst), device="cpu", batch_size=1).model).__name__ == "MLKVForCausalLM"
    assert max(abs(a - b) for a, b in zip(*scores)) <= 1e-4
