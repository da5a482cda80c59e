"""lm-evaluation-harness's ``HFLM`` with a batched read-back of log-likelihoods.

``HFLM._loglikelihood_tokens`` scores each request of a batch on its own: a log-softmax over the whole padded batch,
then per request a slice, an argmax, a gather and two host reads (``float(...)``, ``bool(...)``), each of which waits
for the device. Several evaluations sharing one GPU (``mlkv reproduce`` runs 8) wait on each other's kernels there.
On one H200, 8 concurrent full-set evaluations (ARC-Easy, LAMBADA, PIQA, SciQ, HellaSwag: 62,494 requests) of a
12-layer, 384-wide model took 274 s each through ``HFLM`` (batch 64) and 169-195 s each through this class (batch
32; a different run, so the batch sizes differ too). The rest is the harness's host-side work (documents,
tokenization, metrics).

``BatchedHFLM`` keeps everything of ``HFLM`` (the same ``Collator`` ordering, batching, left truncation to
``max_length``, one-token-continuation grouping, cache hook, progress bar) and changes two things:

* the scoring of a batch: the positions every request scores are gathered first, log-softmax and argmax run once
  over those rows, and the results come back to the host in one read per batch. The answers are the same numbers up
  to the order of summation (each request's log-probabilities are summed in float32 and rounded to the model's
  dtype, as ``HFLM`` does). Seq2seq models and ``batch_size="auto"`` fall back to ``HFLM``'s own loop.
* the tokenization: ``HFLM.loglikelihood`` encodes each request twice (context + continuation, then the context),
  one Python call at a time: 21.1 s of host time (profiled) for the 62,494 requests of the full task sets, against
  8.8 s here (``benchmarks/eval_host_cost.py``). Here every distinct string is encoded once, in one batched call
  of the fast tokenizer, before ``HFLM.loglikelihood`` runs; its ``tok_encode`` calls then find their ids ready.
  The ids are the ones ``tok_encode`` gives (same special-token rule; tested on real task requests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator, _add_special_kwargs, has_bos_prefix
from tqdm.auto import tqdm

Request = tuple[tuple[str, str], list[int], list[int]]  # ((context, continuation) strings, context ids, cont. ids)


def _collate(req: Request) -> tuple[int, tuple[int, ...]]:
    """``HFLM``'s sort key: longest context + continuation first (OOMs happen at once, batches pad least)."""
    toks = req[1] + req[2]
    return -len(toks), tuple(toks)


def _one_token_group(req: Request) -> list[int]:
    """``HFLM``'s grouping key: requests that differ only in their last continuation token share one forward."""
    return req[-2] + req[-1][:-1]


def _batches_like_encode(tokenizer) -> bool:
    """A fast tokenizer whose single-string encoding is transformers' own, so ``tokenizer(list)`` gives the ids that
    ``encode`` gives one string at a time (some subclasses special-case single strings, e.g. CodeLlama's infilling)."""
    owner = next((c for c in type(tokenizer).__mro__ if "_encode_plus" in c.__dict__), None)
    return bool(getattr(tokenizer, "is_fast", False)) and owner is not None and \
        owner.__module__.startswith("transformers.tokenization_utils")


class BatchedHFLM(HFLM):
    """``HFLM`` whose causal log-likelihood scoring reads each batch's results back at once, and whose tokenization
    of log-likelihood requests runs as one batched call (see the module doc)."""

    _encoded: dict[tuple[str, bool | None], list[int]] | None = None  # set during loglikelihood only
    _bos: str | None = None

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if self.backend != "causal" or not _batches_like_encode(self.tokenizer):
            return super().loglikelihood(requests, disable_tqdm)
        self._bos = self.tokenizer.decode(self.prefix_token_id)  # tok_encode's test for a leading BOS, once
        self._encoded = self._encode_all(req.args for req in requests)
        try:
            return super().loglikelihood(requests, disable_tqdm)
        finally:
            self._encoded = None

    def _encode_all(self, pairs) -> dict[tuple[str, bool | None], list[int]]:
        """The ids of every string ``HFLM.loglikelihood`` will encode, keyed by (string, add_special_tokens)."""
        wanted = set()
        for context, continuation in pairs:
            if not context:  # HFLM encodes the continuation alone, without special tokens
                wanted.add((continuation, False))
                continue
            spaces = len(context) - len(context.rstrip())  # HFLM._encode_pair: trailing spaces join the continuation
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            wanted.update(((context + continuation, None), (context, None)))
        groups: dict[bool | None, list[str]] = {}
        for string, flag in wanted:
            groups.setdefault(self._special_tokens(string, flag), []).append(string)
        encoded = {}
        for special, strings in groups.items():
            kwargs = {} if special is None else {"add_special_tokens": special}
            for string, ids in zip(strings, self.tokenizer(strings, **kwargs)["input_ids"], strict=True):
                encoded[(string, special)] = ids
        return encoded

    def _special_tokens(self, string: str, add_special_tokens: bool | None) -> bool | None:
        """``HFLM.tok_encode``'s rule for ``add_special_tokens`` (None: the tokenizer's default)."""
        kwargs = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self._bos):
            kwargs["add_special_tokens"] = False
        return kwargs.get("add_special_tokens")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if self._encoded is not None and not left_truncate_len and not kwargs:
            ids = self._encoded.get((string, self._special_tokens(string, add_special_tokens)))
            if ids is not None:
                return list(ids)
        return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if self.backend != "causal" or self.batch_size == "auto":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        re_ord = Collator(requests, sort_fn=_collate, group_by="contexts" if self.logits_cache else None,
                          group_fn=_one_token_group)
        placeholder = torch.empty(1, 1, 1)  # get_cache expands "logits" per grouped request; only its yields matter
        results: list[tuple[float, bool]] = []
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or self.rank != 0),
                    desc="Running loglikelihood requests")
        for chunk in re_ord.get_batched(n=self.batch_size):
            # Inputs as HFLM builds them: (context + continuation), cut from the left to max_length + 1, less the
            # last token; right-padded with zeros, which leaves a causal model's logits at real positions as they are.
            for _, ctx, cont in chunk:  # HFLM asserts the same: else the positions below would wrap around
                if not ctx or not cont or len(cont) > self.max_length:
                    raise ValueError(f"a log-likelihood request needs a non-empty context and a continuation of 1 to "
                                     f"max_length ({self.max_length}) tokens; got {len(ctx)} and {len(cont)}")
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            ids = torch.zeros((len(inputs), max(map(len, inputs))), dtype=torch.long)  # (B, W)
            for row, inp in enumerate(inputs):
                ids[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            logits = self._model_call(ids.to(self.device))  # (B, W, V)

            # Every (request, continuation) this batch answers -- grouped requests share their key's row -- and the
            # positions it scores: the last len(cont) input positions predict the continuation's tokens.
            rows, cols, targets, answers = [], [], [], []
            for row, ((request_str, ctx, cont), inp) in enumerate(zip(chunk, inputs, strict=True)):
                for req_str, cont_toks, _ in re_ord.get_cache(req_str=request_str, cxt_toks=ctx, cont_toks=cont,
                                                              logits=placeholder):
                    n = len(cont_toks)
                    rows += [row] * n
                    cols += range(len(inp) - n, len(inp))
                    targets += cont_toks
                    answers.append((req_str, n))
            target = torch.tensor(targets, dtype=torch.long, device=logits.device)  # (N,)
            scored = logits[torch.tensor(rows, device=logits.device),
                            torch.tensor(cols, device=logits.device)]  # (N, V)
            logprobs = F.log_softmax(scored, dim=-1, dtype=self.softmax_dtype)  # (N, V)
            token_logprob = logprobs.gather(-1, target[:, None]).squeeze(-1)  # (N,)
            greedy = logprobs.argmax(dim=-1) == target  # (N,)
            # Back to the host once a batch; float32 holds every value of the half dtypes exactly.
            token_logprob, greedy = token_logprob.float().cpu(), greedy.cpu().tolist()

            start = 0
            for req_str, n in answers:
                # HFLM's float(logits.sum()): summed with float32 accumulation, rounded to the log-probabilities'
                # dtype (bf16 answers differ by up to 0.25 nats without the rounding)
                total = float(token_logprob[start:start + n].sum().to(logprobs.dtype))
                answer = (total, all(greedy[start:start + n]))
                start += n
                results.append(answer)
                if req_str is not None:  # loglikelihood_rolling's windows have no cache key (HFLM skips them too)
                    self.cache_hook.add_partial("loglikelihood", req_str, answer)
                pbar.update(1)
        pbar.close()
        return re_ord.get_original(results)
