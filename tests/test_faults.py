"""Fault injection: ``mlkv train``, ``mlkv convert`` and the uptraining stage of ``mlkv reproduce`` killed with
SIGKILL at seeded random points (before a file write, a rename, a deletion, an fsync or an optimizer step), then run
again: a resumed run repeats the per-step losses, gradient norms and learning rates of an uninterrupted one and ends
with the same weights, a rerun conversion writes the whole output, and no temporary file or folder is left. CPU;
train and convert use a tiny model and tokenizer made here (no shared data, about a minute), reproduce a tiny
``--smoke`` with mid-run checkpoints on the shared Gutenberg data (skipped without it; slow, about 75 s)."""

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
#: saying where (``killed at point N before NAME(ARGS)``); else it reports how many points it passed. With
#: ``$FAULTS_WITHIN`` (``module:function``) only the points passed inside that function count.
DRIVER = f"""
import importlib, os, signal, sys
from mlkv.cli import main

kill_at, count, counting = int(sys.argv[1]), 0, not os.environ.get("FAULTS_WITHIN")

def point(name, args):
    global count
    if not counting:
        return
    count += 1
    if count == kill_at:
        print(f"killed at point {{count}} before {{name}}({{', '.join(map(str, args[:2]))}})", file=sys.stderr,
              flush=True)
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

def within(module, name):
    owner = importlib.import_module(module)
    real = getattr(owner, name)
    def wrapper(*args, **kwargs):
        global counting
        counting = True
        try:
            return real(*args, **kwargs)
        finally:
            counting = False
    setattr(owner, name, wrapper)

if os.environ.get("FAULTS_WITHIN"):
    within(*os.environ["FAULTS_WITHIN"].split(":"))
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


def mlkv(kill_at: int, *argv: str, within: str = "") -> tuple[int, int | str]:
    """Run ``mlkv argv`` in a fresh process killed at fault point ``kill_at`` (counted inside the function
    ``within``, ``module:function``, if given): (exit code, the points it passed or where it was killed)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "FAULTS_WITHIN": within}
    result = subprocess.run([sys.executable, "-c", DRIVER, str(kill_at), *map(str, argv)], env=env,
                            capture_output=True, text=True, timeout=300)
    if result.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"mlkv {' '.join(map(str, argv))}: exit {result.returncode}\n{result.stderr[-4000:]}")
    lines = result.stderr.splitlines()
    if result.returncode == -signal.SIGKILL:
        where = next(line for line in lines if "killed at point " in line)  # (maybe after a progress bar)
        return result.returncode, where[where.index("killed at point "):]
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


@pytest.mark.slow
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


UPTRAIN = "mlkv.reproduce.pipeline:stage_uptrain"
TRAINED = ("base", "uptrain/MLKV-2-lm", "uptrain/MLKV-2-distill")


def reproduce_args(data: Path, out: Path) -> list:
    """The smallest ``mlkv reproduce --smoke`` with checkpoints inside its runs: a base pretrained for 8 steps, then
    MLKV-2 uptrained for 8 steps with lm and with distill, a checkpoint every 2 steps; one PIQA example."""
    return ["reproduce", "--smoke", "--data-dir", data, "--out", out, "--base-tokens", "2K", "--plans", "MLKV-2",
            "--distill-plans", "MLKV-2", "--init-comparison", "none", "--tasks", "piqa", "--limit", 1,
            "--checkpoints", 4]


def logged(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (steps and validations), without their timings."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def tree(folder: Path) -> list[str]:
    """Every path under ``folder``, relative to it (hidden ones and the token cache's build locks included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.slow
def test_reproduce_killed_at_random_points_of_uptraining_resumes_to_the_uninterrupted_runs_steps_and_weights(
        tmp_path):
    from mlkv.data.paths import default_data_dir
    from mlkv.training.outdir import has_checkpoint

    data = default_data_dir()
    if not (data / "corpus" / "gutenberg").is_dir():
        pytest.skip("shared data not found")
    reference, out = tmp_path / "reference", tmp_path / "killed"
    code, points = mlkv(0, *reproduce_args(data, reference), within=UPTRAIN)
    assert code == 0 and points > 100  # 2 runs x 8 steps, 4 checkpoints and the final model each
    rng, passed, kills, resumable = random.Random(SEED), 0, [], set()
    for _ in range(4):  # each run skips the finished stages and runs, resumes what the last one left, is killed
        code, where = mlkv(rng.randint(1, points - passed), *reproduce_args(data, out), within=UPTRAIN)
        assert code == -signal.SIGKILL, (kills, where)  # at most ``passed`` points of the stage are done
        kills.append(where)
        passed += int(where.split()[3])
        resumable |= {run for run in TRAINED if has_checkpoint(out / run) and not (out / run / "done.json").exists()}
    assert resumable, kills  # a kill left a run its checkpoint to resume mid-run
    assert mlkv(0, *reproduce_args(data, out))[0] == 0
    for run in TRAINED:
        assert logged(out / run) == logged(reference / run), (run, kills)
        expected, got = load_file(reference / run / "model.safetensors"), load_file(out / run / "model.safetensors")
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), run
    assert tree(out) == tree(reference), kills  # no checkpoint left, no .done.json.tmp-*, no .model.tmp-*
    assert hidden(out) == [], kills
