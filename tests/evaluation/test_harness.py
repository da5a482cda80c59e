"""``BatchedHFLM`` answers every log-likelihood request exactly as the harness's own ``HFLM`` does."""

import copy

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from mlkv.data.paths import default_data_dir  # noqa: E402
from mlkv.evaluation import tasks  # noqa: E402
from mlkv.evaluation.harness import BatchedHFLM  # noqa: E402

DATA = default_data_dir()
TOKENIZER_FILE = DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
if not (DATA / "eval").is_dir() or not TOKENIZER_FILE.is_file():
    pytest.skip(f"shared data folder not found ({DATA}); set MLKV_DATA", allow_module_level=True)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256, rotary_pct=0.25)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), eos_token="<|endoftext|>")
    return GPTNeoXForCausalLM(config).eval(), tok


def _task_requests(limit):
    """Real requests of the paper's tasks (multi-token LAMBADA targets, 2- and 4-way multiple choice)."""
    manager = tasks.task_manager("local", DATA)
    requests = []
    for name in ("lambada_openai", "piqa", "arc_easy", "hellaswag", "sciq"):
        task = manager.load([name])["tasks"][name]
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        requests += task.instances
    return requests


def _greedy_and_grouped_requests(model, tok):
    """Requests that are the model's own greedy continuation (is_greedy True), one-token continuations sharing a
    context (the harness's grouped path), and a context longer than max_length (truncated from the left)."""
    context = "The quick brown fox jumps over the lazy"
    ids = tok(context)["input_ids"]
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = tok.decode(ids[len(tok(context)["input_ids"]):])
    args = [(context, greedy), (context, " dog"), (context, " cat"), (context, " the"),
            ("word " * 300, " end of it"), ("Answer:", " A"), ("Answer:", " B")]
    return [Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)], greedy


@pytest.mark.parametrize("batch_size", [pytest.param(1, marks=pytest.mark.slow), pytest.param(5, marks=pytest.mark.slow), 16])
def test_batched_equals_hflm(model_and_tokenizer, batch_size):
    model, tok = model_and_tokenizer
    extra, greedy = _greedy_and_grouped_requests(model, tok)
    requests = _task_requests(limit=6) + extra
    ours = BatchedHFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size, max_length=128)
    theirs = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size, max_length=128)
    got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert len(got) == len(want) == len(requests)
    assert [g for _, g in got] == [g for _, g in want]
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) <= 1e-4
    assert got[len(requests) - len(extra)][1] is True, f"the model's greedy continuation {greedy!r} is greedy"


def test_batched_tokenization_equals_hflm(model_and_tokenizer, monkeypatch):
    """The ids that reach the scoring are HFLM's, for real task requests, an empty context, a context ending in
    spaces and a BOS-prefixed one; and ours come from batched calls, not one ``encode`` per string."""
    model, tok = model_and_tokenizer
    extra, _ = _greedy_and_grouped_requests(model, tok)
    extra += [Instance("loglikelihood", {}, args, 100 + i) for i, args in enumerate(
        [("", " Hello world"), ("Question:  ", " two spaces"), ("<|endoftext|>The end", " is near"), ("x\n", "\ny")])]
    requests = _task_requests(limit=20) + extra
    seen = {}

    def capture(self, reqs, disable_tqdm=False, override_bs=None):
        seen[type(self)] = reqs
        return [(0.0, False)] * len(reqs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", capture)
    monkeypatch.setattr(BatchedHFLM, "_loglikelihood_tokens", capture)
    HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=4).loglikelihood(requests)
    encodes = []
    real_encode = type(tok).encode
    monkeypatch.setattr(type(tok), "encode", lambda self, *a, **k: encodes.append(a) or real_encode(self, *a, **k))
    BatchedHFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=4).loglikelihood(requests)
    assert len(seen[BatchedHFLM]) == len(requests) > 100
    assert seen[BatchedHFLM] == seen[HFLM]
    assert not encodes, f"{len(encodes)} strings were encoded one by one"


def test_tokenizers_that_special_case_single_strings_are_not_batched():
    """Batched tokenization only where a list gives the ids of one string at a time: transformers' own encoding."""
    from mlkv.evaluation.harness import _batches_like_encode

    class Infilling(PreTrainedTokenizerFast):  # like CodeLlama: its own single-string path
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    assert _batches_like_encode(PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE)))
    assert not _batches_like_encode(Infilling(tokenizer_file=str(TOKENIZER_FILE)))


def test_batched_rounds_half_precision_sums_as_hflm(model_and_tokenizer):
    """In bf16 HFLM's answer is the sum rounded to bf16 (ties included); ours is the same number."""
    model, tok = model_and_tokenizer
    half = copy.deepcopy(model).to(torch.bfloat16)
    requests = _task_requests(limit=4)
    got = BatchedHFLM(pretrained=half, tokenizer=tok, backend="causal", batch_size=8).loglikelihood(requests)
    want = HFLM(pretrained=half, tokenizer=tok, backend="causal", batch_size=8).loglikelihood(requests)
    same = sum(a == b for a, b in zip(got, want))
    assert same >= 0.95 * len(requests), f"only {same} of {len(requests)} answers equal HFLM's"


def test_request_longer_than_the_window_is_refused(model_and_tokenizer):
    model, tok = model_and_tokenizer
    lm = BatchedHFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=2, max_length=16)
    with pytest.raises(ValueError, match=r"max_length \(16\).*got \d+ and 17"):
        lm._loglikelihood_tokens([(("a", "b"), [1, 2], list(range(3, 20)))])


def test_run_tasks_uses_batched_scoring(model_and_tokenizer, monkeypatch):
    """``run_tasks`` scores through ``BatchedHFLM``: its results equal the harness's ``HFLM`` on the same model."""
    model, tok = model_and_tokenizer
    calls = []
    batched = BatchedHFLM._loglikelihood_tokens
    monkeypatch.setattr("mlkv.evaluation.harness.BatchedHFLM._loglikelihood_tokens",
                        lambda self, *a, **k: calls.append(type(self)) or batched(self, *a, **k))
    ours = tasks.run_tasks(model, ["piqa", "lambada_openai"], limit=8, batch_size=4, data_dir=DATA, tokenizer=tok,
                        bootstrap_iters=0)
    assert calls and set(calls) == {BatchedHFLM}
    monkeypatch.setattr("mlkv.evaluation.harness.BatchedHFLM._loglikelihood_tokens", HFLM._loglikelihood_tokens)
    theirs = tasks.run_tasks(model, ["piqa", "lambada_openai"], limit=8, batch_size=4, data_dir=DATA, tokenizer=tok,
                          bootstrap_iters=0)
    for task in ("piqa", "lambada_openai"):
        assert ours["results"][task]["acc,none"] == theirs["results"][task]["acc,none"]
    assert ours["results"]["lambada_openai"]["perplexity,none"] == pytest.approx(
        theirs["results"]["lambada_openai"]["perplexity,none"], rel=1e-5)
