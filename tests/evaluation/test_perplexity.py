"""Perplexity (``mlkv.evaluation.perplexity``): the sliding window scores each token once, and the document-level
numbers equal the harness's (CPU, offline, a tiny random model with the real Pythia tokenizer)."""

import math
import re

import pytest
import torch

from mlkv.data import read_documents
from mlkv.data.paths import default_data_dir
from mlkv.errors import UsageError
from mlkv.evaluation import perplexity as ppl
from mlkv.evaluation import tasks
from mlkv.evaluation.task_configs import converters
from mlkv.evaluation.token_budget import cut_document

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


def _count_forward_tokens(model, monkeypatch) -> list[int]:
    """Every input token the model is given (batch size 1: no padding), appended per forward."""
    fed = []
    real = type(model).forward
    monkeypatch.setattr(type(model), "forward",
                        lambda self, input_ids=None, **kw: fed.append(input_ids.numel()) or real(self, input_ids, **kw))
    return fed


def test_max_tokens_bounds_both_passes_and_the_reading_of_a_file_of_whole_books(tiny, monkeypatch):
    """Gutenberg without --limit (whole books, ~5.4M tokens): 600 tokens per pass are read and scored, the book that
    crosses the budget is cut between words, and words and bytes count what was scored."""
    model, tok = tiny
    fed = _count_forward_tokens(model, monkeypatch)
    path = ppl.resolve_perplexity_path("gutenberg", DATA)
    result = ppl.perplexity_file(model, tok, path, max_length=128, stride=128, max_tokens=600, progress=False)
    doc = result["document_level"]
    assert result["documents"] == 1 and result["token_level"]["text_tokens"] == 600  # one book read, no more
    assert 0.99 * 600 <= doc["scored_tokens"] <= 600 and doc["last_document_cut"] and doc["documents"] == 1
    assert sum(fed) <= 2 * 600 + 128  # a document's last rolling window also reads up to max_length of context
    book = next(iter(read_documents(path)))
    cut = cut_document(book, lambda text: len(tok.encode(text)), 600)
    assert book.startswith(cut) and book[len(cut)].isspace() and doc["words"] == len(re.split(r"\s+", cut))
    assert doc["bytes"] == len(cut.encode("utf-8"))
    assert doc["loglikelihood"] == pytest.approx(ppl.rolling_loglikelihoods(model, tok, [cut], 128, progress=False)[0],
                                                 rel=1e-6)


def test_max_tokens_on_wikitext_keeps_whole_pages_that_fit_and_counts_the_detokenized_tokens(tiny):
    model, tok = tiny
    path = ppl.resolve_perplexity_path("wikitext2", DATA)
    pages = converters.read_wikitext_pages(path)
    first = len(tok.encode(ppl.wikitext_detokenize(pages[0])))
    budget = first + 300
    doc = ppl.perplexity_file(model, tok, path, max_length=256, max_tokens=budget, progress=False)["document_level"]
    assert doc["documents"] == 2 and doc["last_document_cut"] and first < doc["scored_tokens"] <= budget
    assert doc["words"] > len(re.split(r"\s+", pages[0])) and doc["bytes"] < len(pages[0].encode()) + len(pages[1])


def test_cut_document_ends_between_words_within_the_budget():
    words = lambda text: len(text.split())  # noqa: E731 (a count of one token per word)
    assert cut_document("alpha beta gamma delta", words, 2) == "alpha beta"
    assert cut_document("alpha beta gamma delta", lambda text: len(text), 13) == "alpha beta"  # gamma split
    assert cut_document("alpha", words, 0) == ""
    text = " ".join(f"w{i}" for i in range(10_000))
    assert words(cut_document(text, words, 777)) == 777


def test_the_progress_bar_counts_the_tokens_the_model_reads(tiny, monkeypatch):
    """Its total is the input tokens of every window and it advances by each batch's, so its ETA follows the work
    (windows of a document-level pass differ in length)."""
    model, tok = tiny
    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n, self.kwargs = total, 0, kwargs
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(ppl, "tqdm", Bar)
    fed = _count_forward_tokens(model, monkeypatch)
    docs = [page[:900] for page in converters.read_wikitext_pages(DATA / "eval/wikitext2/wiki.test.raw")[:3]]
    ppl.rolling_loglikelihoods(model, tok, docs, max_length=64, batch_size=1)
    assert bars[0].kwargs["unit"] == "tok" and bars[0].total == bars[0].n == sum(fed)
