"""Perplexity (``mlkv.evaluation.perplexity``): the sliding window scores each token once, and the document-level
numbers equal the harness's (CPU, offline, a tiny random model with the real Pythia tokenizer)."""

import math

import pytest
import torch

from mlkv.data.paths import default_data_dir
from mlkv.errors import UsageError
from mlkv.evaluation import perplexity as ppl
from mlkv.evaluation import tasks
from mlkv.evaluation.task_configs import converters

DATA = default_data_dir()
if not (DATA / "eval").is_dir() or not (DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json").is_file():
    pytest.skip(f"shared data folder not found ({DATA}); set MLKV_DATA", allow_module_level=True)

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

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
        result = ppl.perplexity(model, tok, TEXT, max_length=max_length, stride=max_length, progress=False)
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
        result = ppl.perplexity(model, tok, TEXT, max_length=max_length, stride=stride, batch_size=batch_size,
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
    ours = ppl.rolling_loglikelihoods(model, tok, docs, max_length=32, batch_size=3, progress=False)
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_word_byte_perplexity_equals_harness_wikitext_task(tiny):
    model, tok = tiny
    harness = tasks.run_tasks(model, ["wikitext"], limit=2, batch_size=4, tokenizer=tok)["results"]["wikitext"]
    pages = converters.read_wikitext_pages(DATA / "eval/wikitext2/wiki.test.raw")[:2]
    ours = ppl.word_byte_perplexity(model, tok, pages, detokenize=ppl.wikitext_detokenize, batch_size=4,
                                    progress=False)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[metric] == pytest.approx(harness[f"{metric},none"], rel=1e-5), metric
    assert ours["max_length"] == 256 and ours["documents"] == 2


def test_perplexity_file_jsonl_xz(tiny):
    model, tok = tiny
    result = ppl.perplexity_file(model, tok, ppl.resolve_perplexity_path("gutenberg", DATA), max_length=256,
                                 stride=256, limit=1, max_tokens=3000, document_level=False, progress=False)
    assert result["kind"] == "documents" and result["documents"] == 1
    token = result["token_level"]
    # stride == max_length: disjoint windows, whose first tokens have no context and are not scored
    assert token["text_tokens"] == 3000 and token["windows"] == math.ceil(3000 / 256)
    assert token["scored_tokens"] == token["text_tokens"] - token["windows"] and token["perplexity"] > 1.0


def test_stride_longer_than_the_window_is_a_usage_error(tiny):
    model, tok = tiny
    with pytest.raises(UsageError, match="stride"):
        ppl.perplexity(model, tok, TEXT, max_length=8, stride=9)
