"""Fault injection: ``mlkv train`` and ``mlkv convert`` killed with SIGKILL at seeded random points (before a file
write, a rename, a deletion, an fsync or an optimizer step), then run again: a resumed run repeats the per-step
losses, gradient norms and learning rates of an uninterrupted one and ends with the same weights, a rerun
conversion writes the whole output, and no temporary file or folder is left. CPU, a tiny model and tokenizer made
here (no shared data); about a minute."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SRC = Path(__file__).resolve().parents[1] / "src"
SEED = 15
#: Where a process may be killed: just before each call of these (module, attribute path), and before each step.
POINTS = (("os", "replace"), ("os", "fsync"), ("shutil", "rmtree"), ("torch", "save"),
          ("transformers.modeling_utils", "safe_save_file"), ("pathlib", "Path.write_bytes"),
          ("pathlib", "Path.write_text"), ("mlkv.training.loop", "_train_step"))
#: A process that runs an ``mlkv`` command and kills itself with SIGKILL at fault point ``argv[1]`` (0: never),
#: saying where; else it reports how many points it passed.
DRIVER = f"""
import importlib, os, signal, sys
from mlkv.cli import main

kill_at, count = int(sys.argv[1]), 0

def point(name, args):
    global count
    count += 1
    if count == kill_at:
        print(f"killed before {{name}}({{', '.join(map(str, args[:2]))}})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

def before(owner, name):
    real = getattr(owner, name)
    def wrapper(*args, **kwargs):
        point(name, [a for a in args if isinstance(a, (str, os.PathLike))])
        return real(*args, **kwargs)
    setattr(owner, name, wrapper)

for module, path in {POINTS!r}:
    *owners, name = path.split(".")
    owner = importlib.import_module(module)
    for attr in owners:
        owner = getattr(owner, attr)
    before(owner, name)
code = main(sys.argv[2:])
print(f"fault points: {{count}}", file=sys.stderr)
sys.exit(code)
"""
WORDS = ("the old house stood by a river and every night the wind came down from the hills to speak with the "
         "trees about the years that had gone by while a lamp burned in one window").split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tokenizer (byte-level BPE, vocab 300), 200 documents, a tiny MLKV config with attention dropout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("faults")
    rng = random.Random(SEED)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for _ in range(200)]
    (root / "data.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tiny.json").write_text(json.dumps(
        {"model_type": "mlkv", "flavor": "gpt_neox", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
         "attention_dropout": 0.1}))
    return {"root": root}


def mlkv(kill_at: int, *argv: str) -> tuple[int, int | str]:
    """Run ``mlkv argv`` in a fresh process killed at fault point ``kill_at``: (exit code, the points it passed or
    where it was killed)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", DRIVER, str(kill_at), *map(str, argv)], env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"mlkv {' '.join(map(str, argv))}: exit {result.returncode}\n{result.stderr[-4000:]}")
    lines = result.stderr.splitlines()
    if result.returncode == -signal.SIGKILL:
        where = next(line for line in lines if "killed before " in line)  # (maybe after a progress bar)
        return result.returncode, where[where.index("killed before "):]
    return result.returncode, int(next(line for line in lines if line.startswith("fault points: ")).split()[-1])


def train_args(root: Path, out: Path) -> list:
    return ["train", "--model", root / "tiny.json", "--tokenizer", root / "tokenizer.json", "--data",
            root / "data.jsonl", "--cache-dir", root / "cache", "--out", out, "--seq-len", 32, "--micro-batch-size",
            2, "--grad-accum", 2, "--steps", 12, "--save-every", 3, "--lr", "3e-3", "--log-every", 1,
            "--no-progress", "--no-tensorboard", "--resume"]


def steps(out: Path) -> dict[int, tuple]:
    """Per step: loss, LM loss, gradient norm, learning rate (metrics.jsonl, one record a step)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: (r["loss"], r["lm_loss"], r["grad_norm"], r["lr"]) for r in records}
    assert len(by_step) == len(records)  # a resumed run dropped the records past its checkpoint
    return by_step


def hidden(folder: Path) -> list[str]:
    """Hidden entries (temporaries, locks) in ``folder`` and beside it."""
    return sorted(p.name for d in (folder, folder.parent) for p in d.iterdir() if p.name.startswith("."))


def test_train_killed_at_random_points_resumes_to_the_uninterrupted_runs_steps_and_weights(setup):
    root = setup["root"]
    code, points = mlkv(0, *train_args(root, root / "reference"))
    assert code == 0 and points > 30
    rng = random.Random(SEED)
    out, kills = root / "killed", []
    for attempt in range(4):  # each run resumes what the last one left, then is killed in turn
        kills.append(mlkv(rng.randint(1, points // (attempt + 1)), *train_args(root, out)))
    assert sum(code == -signal.SIGKILL for code, _ in kills) >= 3, kills
    assert mlkv(0, *train_args(root, out))[0] == 0
    assert steps(out) == steps(root / "reference") and len(steps(out)) == 12, kills
    expected, got = load_file(root / "reference" / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert sorted(os.listdir(out)) == sorted(os.listdir(root / "reference"))  # no checkpoint.tmp, .old, .model.*
    assert hidden(out) == [], kills


@contextlib.contextmanager
def counting(monkeypatch):
    """Count the fault points the DRIVER would pass, in this process."""
    count = [0]
    for module, path in POINTS:
        *owners, name = path.split(".")
        owner = importlib.import_module(module)
        for attr in owners:
            owner = getattr(owner, attr)
        real = getattr(owner, name)

        def wrapper(*args, _real=real, **kwargs):
            count[0] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)
    yield count
    monkeypatch.undo()


def test_convert_killed_at_random_points_then_rerun_writes_the_whole_output_and_no_temporary(setup, tmp_path,
                                                                                            monkeypatch):
    from tiny import hf_llama

    from mlkv.model.convert import convert_checkpoint

    src = tmp_path / "src"
    hf_llama().save_pretrained(src)
    (src / "tokenizer.json").write_text("{}")
    with counting(monkeypatch) as count:
        reference = convert_checkpoint(src, tmp_path / "reference", plan="2x1")
    rng = random.Random(SEED)
    dst = tmp_path / "dst"
    for _ in range(2):
        code, where = mlkv(rng.randint(1, count[0]), "convert", src, dst, "--plan", "2x1")
        assert code == -signal.SIGKILL, where
        assert not dst.exists() or sorted(os.listdir(dst)) == sorted(os.listdir(reference))  # nothing or all
    if not dst.exists():
        convert_checkpoint(src, dst, plan="2x1")
    assert sorted(os.listdir(dst)) == sorted(os.listdir(reference))
    expected, got = load_file(reference / "model.safetensors"), load_file(dst / "model.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert hidden(dst) == []
