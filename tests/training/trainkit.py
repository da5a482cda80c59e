"""What the training tests share: a tiny model config (hidden 32, 2 layers, vocab 50304 to cover the GPT-NeoX
tokenizer), a ``TrainConfig`` of a few steps on 2 books of the shared Gutenberg val file at seq_len 64, and readers
of a run's metrics. Tests that use the shared data are skipped when it is absent."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mlkv.data import default_data_dir
from mlkv.training import TrainConfig

DATA = default_data_dir()
VAL_FILE = DATA / "corpus" / "gutenberg" / "val.jsonl.xz"
TOKENIZER = DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
SRC = Path(__file__).resolve().parents[2] / "src"
needs_data = pytest.mark.skipif(not (VAL_FILE.is_file() and TOKENIZER.is_file()), reason="shared data not found")

TINY = {"model_type": "mlkv", "flavor": "gpt_neox", "vocab_size": 50304, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128}


def write_config(folder: Path, name: str = "tiny.json", **overrides) -> Path:
    path = folder / name
    path.write_text(json.dumps({**TINY, **overrides}))
    return path


def make_config(workdir: Path, out: Path, model: Path | str | None = None, **kw) -> TrainConfig:
    fields = dict(model=str(model or write_config(workdir)), out=str(out), data=[str(VAL_FILE)],
                  tokenizer=str(TOKENIZER), max_documents=2, val_fraction=0.5, cache_dir=str(workdir / "cache"),
                  seq_len=64, micro_batch_size=4, lr=3e-3, log_every=1, eval_every=0, eval_batches=10,
                  save_every=0, progress=False, tensorboard=False)
    return TrainConfig(**{**fields, **kw})


def cli_flags(cfg: TrainConfig, **changes) -> list[str]:
    """The ``mlkv train`` flags that give ``cfg`` (with ``changes``)."""
    cfg = dataclasses.replace(cfg, **changes)
    default = TrainConfig(model="", out="")
    flags = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if value == getattr(default, f.name) and f.name not in ("model", "out") or value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return flags


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def hidden_entries(folder: Path) -> list[str]:
    """Hidden files and folders in ``folder`` and beside it (temporaries, locks)."""
    return sorted(p.name for d in (folder, folder.parent) if d.is_dir() for p in d.iterdir() if p.name.startswith("."))
