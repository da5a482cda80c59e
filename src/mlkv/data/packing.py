"""Packed training sequences: ``PackedDataset`` (fixed-length windows of a token array, deterministic shuffling by
seed, a resumable batch iterator with an explicit sample position) and ``prepare_data``, the whole token pipeline in
one call.

The pipeline, top to bottom:

1. ``read_documents``    -- stream documents (``str``) from local files/folders or Hugging Face ``datasets``
                            (``mlkv.data.sources``).
2. ``load_tokenizer``    -- the checkpoint's HF tokenizer (``tokenizer.json`` or a tokenizer dir;
                            ``mlkv.data.tokenizer``).
3. ``build_token_store`` -- batched tokenization, one EOS after every document, written once to an on-disk
                            cache (memory-mapped ``uint16``/``uint32``) keyed by a hash of everything that
                            changes the tokens; a second call loads the cache without tokenizing (``mlkv.data.store``).
4. ``split_by_document`` -- deterministic held-out validation split by whole documents (``mlkv.data.store``).
5. ``PackedDataset``     -- fixed-length packed sequences, deterministic shuffling by seed and a resumable
                            batch iterator (explicit sample position).
6. ``prepare_data``      -- all of the above in one call, plus a stats dict.

Packing into ``seq_len`` sequences drops the last partial sequence; the number of dropped tokens is reported as
``dropped_tail_tokens`` (it is always ``< seq_len``). Samples follow the Hugging Face convention: a sample is
``seq_len`` tokens and ``labels = input_ids``; the model shifts the labels internally.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlkv.data.sources import is_hf_source, list_source_files
from mlkv.data.store import TokenSegments, TokenStore, build_token_store, split_by_document

logger = logging.getLogger(__name__)

#: ``PackedDataset.fingerprint`` reads this many evenly spaced runs of this many tokens.
FINGERPRINT_BLOCKS = 64
FINGERPRINT_BLOCK_TOKENS = 4096


class PackedDataset(torch.utils.data.Dataset):
    """Consecutive ``seq_len``-token windows of a 1-D token array, in a seeded random order.

    Sequence ``j`` is ``tokens[j*seq_len:(j+1)*seq_len]``; the last ``len(tokens) % seq_len`` tokens
    (``dropped_tail_tokens``) belong to no sequence. ``dataset[i]`` is the ``i``-th sample of epoch 0's order.
    The sample stream runs over epochs, each a fresh permutation from ``(seed, epoch)``: global sample ``g``
    is position ``g % len`` of epoch ``g // len``, so a training loop resumes exactly from a sample index.
    """

    def __init__(self, tokens: np.ndarray | TokenSegments, seq_len: int, seed: int = 0, shuffle: bool = True):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = tokens  # (N,)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_sequences = len(tokens) // self.seq_len
        self.dropped_tail_tokens = len(tokens) - self.num_sequences * self.seq_len
        if self.num_sequences == 0:
            raise ValueError(f"only {len(tokens)} tokens: not enough for one sequence of seq_len={seq_len}")
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_sequences

    def order(self, epoch: int = 0) -> np.ndarray:
        """(S,) int64 sequence indices in the order of ``epoch`` (identity when ``shuffle=False``)."""
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            n = self.num_sequences
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(n) if self.shuffle else np.arange(n, dtype=np.int64)
        return self._orders[epoch]

    def sequence(self, index: int) -> torch.Tensor:
        """(seq_len,) int64 tokens of packed sequence ``index`` (unshuffled numbering)."""
        start = int(index) * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len], dtype=np.int64))

    def sample(self, global_index: int) -> torch.Tensor:
        """(seq_len,) int64 sample at position ``global_index`` of the endless multi-epoch stream."""
        epoch, position = divmod(int(global_index), self.num_sequences)
        return self.sequence(self.order(epoch)[position])

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.num_sequences <= index < self.num_sequences:
            raise IndexError(f"sample {index} out of range for {self.num_sequences} sequences")
        return self.sample(index % self.num_sequences)

    def batches(
        self,
        batch_size: int,
        start: int = 0,
        loop: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[torch.Tensor]:
        """(B, T) int64 batches of consecutive samples of the stream, starting at global sample ``start``.

        Each step consumes ``batch_size * world_size`` samples; ``rank`` gets its ``batch_size`` slice.
        ``loop=False``: one pass over samples ``[start, len)``, the last batch may be short unless
        ``drop_last`` (with ``drop_last``, every rank gets the same number of batches). ``loop=True``: endless,
        epochs reshuffled by ``(seed, epoch)`` and batches crossing epoch boundaries; resume with
        ``start = step * batch_size * world_size``.
        """
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        step_samples = batch_size * world_size
        first = int(start)
        while True:
            if not loop and (first >= self.num_sequences or (drop_last and first + step_samples > self.num_sequences)):
                return
            begin = first + rank * batch_size
            end = begin + batch_size if loop else min(begin + batch_size, self.num_sequences)
            if end > begin:
                yield torch.stack([self.sample(g) for g in range(begin, end)])  # (B, T)
            first += step_samples

    def iter_batches(
        self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[torch.Tensor]:
        """Endless (B, T) training batches from optimizer step ``start_step`` (for exact resumption)."""
        return self.batches(batch_size, start_step * batch_size * world_size, True, True, rank, world_size)

    def fingerprint(self, blocks: int = FINGERPRINT_BLOCKS, block_tokens: int = FINGERPRINT_BLOCK_TOKENS) -> str:
        """A sha256 (hex, 16 digits) of the tokens' count and dtype and of ``blocks`` evenly spaced runs of
        ``block_tokens`` tokens: another corpus, tokenizer, split or limit changes it, and it costs the same at any
        size (a resumed run checks it against the one it started with)."""
        digest = hashlib.sha256(f"{len(self.tokens)} {np.dtype(self.tokens.dtype).name}".encode())
        n = len(self.tokens)
        for start in sorted({int(i * max(0, n - block_tokens) / max(1, blocks - 1)) for i in range(blocks)}):
            digest.update(np.ascontiguousarray(self.tokens[start : start + block_tokens]).tobytes())
        return digest.hexdigest()[:16]

    def num_batches(self, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
        """Steps in one ``loop=False`` pass from sample 0."""
        step_samples = batch_size * world_size
        full, rest = divmod(self.num_sequences, step_samples)
        return full + (0 if drop_last or rest == 0 else 1)


# ---- everything together --------------------------------------------------------------------------------------------
def _local_files(sources: Sequence[str]) -> set[Path]:
    return {p.resolve() for s in sources if not is_hf_source(s) for p in list_source_files(s)}


def prepare_data(
    train_sources: Sequence[str | os.PathLike] | str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    seq_len: int = 2048,
    val_sources: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    text_field: str = "text",
    max_documents: int | None = None,
    max_tokens: int | None = None,
    val_max_documents: int | None = None,
    val_max_tokens: int | None = None,
    eos_id: int | None = None,
    progress: bool = True,
    allow_bad_text: bool = False,
) -> tuple[PackedDataset, PackedDataset | None, dict[str, Any]]:
    """Train (shuffled by ``seed``) and optional validation (in order) datasets, plus stats.

    Validation comes from ``val_sources`` (e.g. the corpus' own ``val.jsonl.xz``) or, with ``val_fraction``,
    from held-out training documents -- not both. ``val_max_documents``/``val_max_tokens`` limit the val
    sources (default: the training limits). Stats: documents, tokens, sequences, dropped tail tokens per split,
    and read counters (skipped lines, decode errors, empty documents). ``allow_bad_text``: train on what decodes of
    a mostly undecodable file instead of refusing it.
    """
    train_list = _as_source_list(train_sources)
    val_list = _as_source_list(val_sources) if val_sources is not None else []
    if val_list and val_fraction > 0:
        raise ValueError("give val_sources or val_fraction, not both")
    overlap = _local_files(train_list) & _local_files(val_list) if val_list else set()
    if overlap:
        raise ValueError(f"files used for both training and validation: {sorted(map(str, overlap))}")

    common = {
        "tokenizer_path": tokenizer_path,
        "cache_dir": cache_dir,
        "text_field": text_field,
        "eos_id": eos_id,
        "progress": progress,
        "allow_bad_text": allow_bad_text,
    }
    train_store = build_token_store(train_list, max_documents=max_documents, max_tokens=max_tokens, **common)
    val_store = None
    if val_list:
        val_store = build_token_store(
            val_list,
            max_documents=max_documents if val_max_documents is None else val_max_documents,
            max_tokens=max_tokens if val_max_tokens is None else val_max_tokens,
            **common,
        )
    elif val_fraction > 0:
        train_store, val_store = split_by_document(train_store, val_fraction, seed)

    built = [train_store] + ([val_store] if val_list else [])  # stores read from sources (not split views)
    train = _packed(train_store, seq_len, seed, True, "training", train_list)
    val = _packed(val_store, seq_len, seed, False, "validation", val_list or train_list) if val_store else None
    stats = _data_stats(seq_len, seed, built, [("train", train_store, train), ("val", val_store, val)])
    logger.info("data: %s", stats)
    return train, val, stats


def _data_stats(seq_len: int, seed: int, built: list[TokenStore],
                splits: list[tuple[str, TokenStore | None, PackedDataset | None]]) -> dict[str, Any]:
    """``prepare_data``'s stats: read counters summed over the stores ``built`` from sources, and per split its
    documents, tokens, sequences, dropped and truncated tokens and cache folder."""
    first = built[0]
    stats = {"seq_len": seq_len, "seed": seed, "eos_id": first.meta["eos_id"], "dtype": first.dtype.name}
    for counter in ("skipped_lines", "decode_errors", "empty_documents"):
        stats[counter] = sum(store.meta["read_stats"][counter] for store in built)
    for name, store, dataset in splits:
        if store is None:
            continue
        stats.update(
            {
                f"{name}_documents": store.num_documents,
                f"{name}_tokens": store.num_tokens,
                f"{name}_sequences": len(dataset),
                f"{name}_dropped_tail_tokens": dataset.dropped_tail_tokens,
                f"{name}_truncated_tokens": store.meta["truncated_tokens"],
                f"{name}_cache": str(store.path),
                f"{name}_from_cache": store.from_cache,
            }
        )
    return stats


def _as_source_list(sources: Sequence[str | os.PathLike] | str | os.PathLike) -> list[str]:
    return [str(sources)] if isinstance(sources, (str, os.PathLike)) else [str(s) for s in sources]


def _packed(store: TokenStore, seq_len: int, seed: int, shuffle: bool, what: str, sources: list[str]) -> PackedDataset:
    if store.num_tokens < seq_len:
        raise ValueError(
            f"{what} data from {', '.join(sources)} has {store.num_tokens} tokens, fewer than seq_len={seq_len}"
        )
    return PackedDataset(store.tokens, seq_len, seed, shuffle)
