"""Tests of mlkv.evaluation.evaluate and the local lm-eval task copies (CPU, offline, real shared data files).

Everything runs on tiny random models with the real GPT-NeoX tokenizer; the whole file skips when the shared data
folder (``$MLKV_DATA`` or ``../shared/data``) is missing.
"""

import argparse
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from mlkv.evaluation import evaluate as ev
from mlkv.data.pipeline import default_data_dir
from mlkv.evaluation.tasks import converters

DATA = default_data_dir()
TOKENIZER_FILE = DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
if not (DATA / "eval").is_dir() or not TOKENIZER_FILE.is_file():
    pytest.skip(f"shared data folder not found ({DATA}); set MLKV_DATA", allow_module_level=True)

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

LM_EVAL_TASKS = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
ZERO_SHOT_TASKS = ["lambada_openai", "piqa", "arc_easy", "sciq", "hellaswag", "boolq", "openbookqa"]


def _tokenizer():
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 2-layer GPT-NeoX (Pythia vocabulary) saved with the real Pythia tokenizer."""
    path = tmp_path_factory.mktemp("tiny_neox")
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256, rotary_pct=0.25)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return ev.load_model(tiny_dir, device="cpu")


# ----------------------------------------------------------------------------------------------------------
# Converters
# ----------------------------------------------------------------------------------------------------------

EXPECTED = {
    "lambada_openai": (5153, {"text"}),
    "piqa": (1838, {"goal", "sol1", "sol2", "label"}),
    "arc_easy": (2376, {"question", "choices", "answerKey"}),
    "hellaswag": (10042, {"activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label"}),
    "sciq": (1000, {"question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"}),
    "boolq": (3270, {"passage", "question", "label"}),
    "openbookqa": (500, {"question_stem", "choices", "answerKey"}),
    "wikitext": (62, {"page"}),
}


@pytest.mark.parametrize("task", list(EXPECTED))
def test_converter_counts_and_fields(task):
    docs = converters.READERS[task](DATA)
    count, fields = EXPECTED[task]
    assert len(docs) == count
    assert all(set(doc) == fields for doc in docs)
    if "choices" in fields:
        assert all(doc["answerKey"] in doc["choices"]["label"] for doc in docs)
        assert all(len(doc["choices"]["text"]) == len(doc["choices"]["label"]) for doc in docs)
    dataset = converters.load_task_dataset(task, DATA)
    assert list(dataset) == [converters.TASK_SPLITS[task]] and len(dataset[converters.TASK_SPLITS[task]]) == count


def test_converter_values():
    piqa = converters.read_piqa(DATA)
    assert piqa[0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?" and piqa[0]["label"] == 0
    assert {d["label"] for d in piqa} == {0, 1}
    arc = converters.read_arc_easy(DATA)[0]
    assert arc["question"] == "Which statement best explains why photosynthesis is the foundation of most food webs?"
    assert arc["answerKey"] == "A" and arc["choices"]["label"] == ["A", "B", "C", "D"]
    padded = [d for d in converters.read_arc_easy(DATA) if len(d["choices"]["text"]) == 3]
    assert len(padded) == 7  # llm-foundry's repeated distractor dropped
    puppy = next(d for d in padded if d["question"] == "A male puppy inherits traits from")
    assert puppy["choices"]["text"] == ["its mother, only", "both parents", "its father, only"]
    assert puppy["answerKey"] == "B"
    boolq = converters.read_boolq(DATA)[0]
    assert boolq["question"] == "does ethanol take more energy make that produces" and boolq["label"] == 0
    assert boolq["passage"].startswith("All biomass goes through") and "\nQuestion" not in boolq["passage"]
    pages = converters.read_wikitext(DATA)
    assert pages[0]["page"].startswith(" = Robert Boulter = \n")
    assert all(p["page"].lstrip().startswith("= ") for p in pages)


def test_hellaswag_query_split():
    split = converters.split_hellaswag_query
    assert split("Roof shingle removal: A man is sitting on a roof. he") == {
        "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he"}
    wikihow = split("Family Life: How to keep a pacifier. Install mesh netting inside the crib.")
    assert wikihow["ctx_b"] == ""
    assert wikihow["ctx_a"] == "How to keep a pacifier. Install mesh netting inside the crib."
    assert split("Canoeing: two people paddle")["ctx_b"] == "two people paddle"


def test_wikitext_split_matches_document_level_rules():
    raw = " \n = A = \n \n text a \n = = Sub = = \n more \n = B = \n text b \n"
    assert converters.split_wikitext_documents(raw) == [
        " = A = \n \n text a \n = = Sub = = \n more ", " = B = \n text b \n"]


# ----------------------------------------------------------------------------------------------------------
# Our task copies build exactly the harness's requests
# ----------------------------------------------------------------------------------------------------------


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
    task = ev.task_manager("local", DATA).load([name])["tasks"][name]
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


# ----------------------------------------------------------------------------------------------------------
# The real harness on a tiny model
# ----------------------------------------------------------------------------------------------------------


def test_run_tasks_limit_20(tiny_dir, tmp_path):
    results = ev.run_tasks(tiny_dir, ZERO_SHOT_TASKS, limit=20, batch_size=8, device="cpu")
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

    table = ev.markdown_table(results)
    for task in ZERO_SHOT_TASKS:
        assert f"| {task} | acc |" in table
    path = ev.save_results(results, tmp_path / "run" / ev.RESULTS_FILE)
    assert json.loads(path.read_text())["results"]["piqa"]["acc,none"] == results["results"]["piqa"]["acc,none"]
    assert not [p for p in path.parent.iterdir() if p.name != ev.RESULTS_FILE]  # no temp file left
    rows = ev.compare_rows([path.parent, path])
    assert rows[0]["piqa"] == results["results"]["piqa"]["acc,none"] and rows[0]["kv_bytes_per_token"] == 256
    expected_avg = sum(results["results"][t]["acc,none"] for t in ev.PAPER_AVERAGE_TASKS) / 4
    assert rows[0]["avg_of_4"] == pytest.approx(expected_avg)
    text = ev.compare([path.parent])
    assert text.splitlines()[0] == ("| config | KV bytes/token | ARC-e | LAMBADA acc (ppl) | PIQA | SciQ | HellaSwag "
                                    "| avg of 4 |")
    lambada = results["results"]["lambada_openai"]
    assert f"{100 * lambada['acc,none']:.2f} ({lambada['perplexity,none']:.1f})" in text


def test_request_cache_gives_the_same_results_without_rebuilding(tiny, tmp_path, monkeypatch):
    """Full-set evaluations share the harness's built requests through ``request_cache``: the second evaluation
    builds nothing and scores the same; the cache folder's name follows the task data files."""
    model, tok = tiny
    cache = tmp_path / "requests"
    kwargs = dict(batch_size=64, tokenizer=tok, bootstrap_iters=0)
    plain = ev.run_tasks(model, ["openbookqa"], **kwargs)  # 500 questions: the whole set
    built = ev.build_request_cache(["openbookqa"], cache)
    assert plain["mlkv"]["request_cache"] is None and [p.name for p in cache.iterdir()] == [built.name]
    assert len(list(built.iterdir())) == 1
    constructed = []
    real = ConfigurableTask.construct_requests
    monkeypatch.setattr(ConfigurableTask, "construct_requests",
                        lambda self, *a, **k: constructed.append(1) or real(self, *a, **k))
    cached = ev.run_tasks(model, ["openbookqa"], request_cache=cache, **kwargs)
    assert not constructed, "the requests were built again"
    assert cached["mlkv"]["request_cache"] == str(built)
    import lm_eval.caching.cache
    assert lm_eval.caching.cache.PATH != str(built)  # the harness's global folder is put back
    assert cached["results"]["openbookqa"] == plain["results"]["openbookqa"]
    limited = ev.run_tasks(model, ["openbookqa"], limit=5, request_cache=cache, **kwargs)
    assert limited["mlkv"]["request_cache"] is None and len(constructed) == 5  # --limit: no cache, 5 built

    copy = tmp_path / "data"
    (copy / "eval" / "openbookqa").mkdir(parents=True)
    rel = converters.TASK_FILES["openbookqa"][0]
    (copy / rel).write_bytes((DATA / rel).read_bytes())
    first = ev.request_cache_dir(cache, ["openbookqa"], copy)
    assert first != built  # another data folder
    with open(copy / rel, "a") as f:
        f.write("\n")
    assert ev.request_cache_dir(cache, ["openbookqa"], copy) != first  # the file changed


def test_mlkv_checkpoint_through_harness(tmp_path):
    """An MLKV checkpoint loads through AutoModelForCausalLM and reports its shared KV cache."""
    from mlkv import MLKVForCausalLM, preset_config

    torch.manual_seed(0)
    config = preset_config("tiny-neox", plan="mlkv-2", vocab_size=50304)
    MLKVForCausalLM(config).save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    results = ev.run_tasks(tmp_path, ["piqa"], limit=4, batch_size=4, device="cpu")
    assert results["mlkv"]["model_type"] == "mlkv"
    assert results["mlkv"]["kv_cache"]["kv_layers"] == 2
    assert results["mlkv"]["kv_cache"]["bytes_per_token"] == config.kv_bytes_per_token()
    assert results["n-samples"]["piqa"]["effective"] == 4


# ----------------------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------------------

TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure in "
        "Paris. Its base is square, measuring 125 metres on each side. During its construction, the Eiffel Tower "
        "surpassed the Washington Monument to become the tallest man-made structure in the world.")


@torch.no_grad()
def test_perplexity_full_context_equals_direct(tiny):
    model, tok = tiny
    ids = tok(TEXT)["input_ids"]
    logits = model(torch.tensor([ids])).logits[0, :-1]
    direct = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).exp().item()
    for max_length in (len(ids), len(ids) + 17, 256):
        result = ev.perplexity(model, tok, TEXT, max_length=max_length, stride=max_length, progress=False)
        assert result["perplexity"] == pytest.approx(direct, rel=1e-5)
        assert result["scored_tokens"] == len(ids) - 1 and result["windows"] == 1


@torch.no_grad()
def test_sliding_window_scores_each_token_with_its_window_context(tiny):
    """Every token after the first is scored once, conditioned on the tokens since its window's start."""
    model, tok = tiny
    ids = tok(TEXT)["input_ids"]
    max_length, stride = 16, 5
    ends = [min(b + max_length, len(ids)) for b in range(0, len(ids), stride)]
    nll = 0.0
    for i in range(1, len(ids)):
        begin = next(k * stride for k, end in enumerate(ends) if end > i)  # the first window reaching token i
        logits = model(torch.tensor([ids[begin:i]])).logits[0, -1]
        nll -= torch.log_softmax(logits, -1)[ids[i]].item()
    expected = math.exp(nll / (len(ids) - 1))
    for batch_size in (1, 3):
        result = ev.perplexity(model, tok, TEXT, max_length=max_length, stride=stride, batch_size=batch_size,
                               progress=False)
        assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert result["scored_tokens"] == len(ids) - 1


def test_rolling_loglikelihood_equals_harness(tiny):
    """Our rolling windows give the harness's HFLM.loglikelihood_rolling, several windows per document."""
    model, tok = tiny
    docs = [page[:1500] for page in converters.read_wikitext_pages(DATA / "eval/wikitext2/wiki.test.raw")[:3]]
    docs.append("short")
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=4, max_length=32)
    requests = [Instance("loglikelihood_rolling", {}, (doc,), i) for i, doc in enumerate(docs)]
    theirs = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    ours = ev.rolling_loglikelihoods(model, tok, docs, max_length=32, batch_size=3, progress=False)
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_word_byte_perplexity_equals_harness_wikitext_task(tiny):
    model, tok = tiny
    harness = ev.run_tasks(model, ["wikitext"], limit=2, batch_size=4, tokenizer=tok)["results"]["wikitext"]
    pages = converters.read_wikitext_pages(DATA / "eval/wikitext2/wiki.test.raw")[:2]
    ours = ev.word_byte_perplexity(model, tok, pages, detokenize=ev.wikitext_detokenize, batch_size=4,
                                   progress=False)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[metric] == pytest.approx(harness[f"{metric},none"], rel=1e-5), metric
    assert ours["max_length"] == 256 and ours["documents"] == 2


def test_perplexity_file_jsonl_xz(tiny):
    model, tok = tiny
    result = ev.perplexity_file(model, tok, ev.resolve_perplexity_path("gutenberg", DATA), max_length=256,
                                stride=256, limit=1, max_tokens=3000, document_level=False, progress=False)
    assert result["kind"] == "documents" and result["documents"] == 1
    token = result["token_level"]
    # stride == max_length: disjoint windows, whose first tokens have no context and are not scored
    assert token["text_tokens"] == 3000 and token["windows"] == math.ceil(3000 / 256)
    assert token["scored_tokens"] == token["text_tokens"] - token["windows"] and token["perplexity"] > 1.0


# ----------------------------------------------------------------------------------------------------------
# KV cache size, command line, errors
# ----------------------------------------------------------------------------------------------------------


def test_kv_bytes_per_token_matches_paper_table():
    pythia = GPTNeoXConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
    assert ev.kv_cache_info(pythia)["bytes_per_token"] == 36_864
    from mlkv import preset_config

    for plan, expected in [("mha-144", 36_864), ("gqa-48", 12_288), ("mlkv-48", 12_288), ("mlkv-12", 3_072),
                           ("mlkv-6", 1_536), ("mlkv-1", 256)]:
        assert ev.kv_cache_info(preset_config("pythia-160m", plan=plan))["bytes_per_token"] == expected, plan


def _args(*argv):
    return ev.add_eval_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv])


def test_eval_command(tiny_dir, tmp_path, capsys):
    output = tmp_path / "tiny_results.json"
    code = ev.run_eval_command(_args(tiny_dir, "--tasks", "piqa,arc_easy", "--limit", 2, "--perplexity",
                                     "wikitext2", "--device", "cpu", "--data-dir", DATA, "--output", output,
                                     "--max-length", 128, "--compare", output))
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary["tasks"]) == {"piqa", "arc_easy"} and "acc" in summary["tasks"]["piqa"]
    ppl = summary["perplexity"]["wikitext2"]
    assert ppl["token_perplexity"] > 1 and ppl["word_perplexity"] > ppl["byte_perplexity"] > 1
    assert "| piqa | acc |" in out and "| wikitext2 (ppl) | word_perplexity |" in out
    assert "| config | KV bytes/token |" in out and len(summary["compare"]) == 2
    saved = ev.load_results(output)
    assert saved["mlkv"]["perplexity"]["wikitext2"]["documents"] == 2
    assert saved["mlkv"]["perplexity"]["wikitext2"]["token_level"]["max_length"] == 128


def test_missing_data_file_names_file_and_setting(tiny_dir, tmp_path, capsys):
    with pytest.raises(converters.DataFileNotFoundError, match=r"piqa/valid\.jsonl.*--data-dir.*MLKV_DATA"):
        ev.run_tasks(tiny_dir, ["piqa"], limit=2, device="cpu", data_dir=tmp_path)
    with pytest.raises(converters.DataFileNotFoundError, match=r"wiki\.test\.raw.*MLKV_DATA"):
        ev.resolve_perplexity_path("wikitext2", tmp_path)
    with pytest.raises(converters.DataFileNotFoundError, match="perplexity file not found"):
        ev.resolve_perplexity_path(tmp_path / "nope.txt")
    assert ev.run_eval_command(_args(tiny_dir, "--tasks", "sciq", "--data-dir", tmp_path)) == 2
    assert "sciq_test.jsonl" in capsys.readouterr().err


def test_unknown_task_lists_supported(tiny_dir, capsys):
    with pytest.raises(ev.UnknownTaskError, match=r"unknown task\(s\): mmlu.*Supported.*lambada_openai.*piqa"):
        ev.check_tasks(["piqa", "mmlu"])
    assert ev.check_tasks("piqa, sciq") == ["piqa", "sciq"]
    assert ev.run_eval_command(_args(tiny_dir, "--tasks", "nope")) == 2
    assert "arc_easy" in capsys.readouterr().err


def test_usage_errors(tiny, capsys):
    model, tok = tiny
    with pytest.raises(ev.EvalUsageError, match="stride"):
        ev.perplexity(model, tok, TEXT, max_length=8, stride=9)
    assert ev.run_eval_command(_args()) == 2
    assert "give a checkpoint directory" in capsys.readouterr().err


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
