"""The ``mlkv train`` command (mlkv.training.command): its flags come from TrainConfig and stay as they were."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import mlkv.training
from mlkv.settings import field_docs, from_args
from mlkv.training import TrainConfig
from mlkv.training.command import add_train_arguments
from mlkv.training.config import DEFAULT_CHUNK_TOKENS

SRC = Path(__file__).resolve().parents[2] / "src"
#: Every flag of ``mlkv train`` before its flags came from TrainConfig.
FLAGS = """--model --plan --data --val-data --val-fraction --tokenizer --cache-dir --text-field --max-documents
--max-data-tokens --out --tokens --steps --stop-after-steps --seq-len --micro-batch-size --batch-size --grad-accum --lr
--min-lr-ratio --warmup-ratio --weight-decay --beta1 --beta2 --adam-eps --grad-clip --objective --teacher
--distill-temperature --distill-alpha --distill-hidden --loss-chunk-tokens --precision --sdpa-backend --compile
--activation-checkpointing --fsdp --device --seed --peak-tflops --log-every --eval-every --eval-batches --save-every
--resume --no-progress --tensorboard --no-tensorboard""".split()


def parser() -> argparse.ArgumentParser:
    return add_train_arguments(argparse.ArgumentParser(prog="mlkv train"))


def test_flags_are_kept_and_all_have_help():
    actions = [a for a in parser()._actions if a.dest != "help"]
    assert set(FLAGS) <= {flag for a in actions for flag in a.option_strings}
    assert all(a.help and a.help.strip() for a in actions), [a.dest for a in actions if not a.help]
    assert str(DEFAULT_CHUNK_TOKENS) in field_docs(TrainConfig)["loss_chunk_tokens"]


def test_flags_parse_to_the_config():
    args = parser().parse_args(["--model", "m", "--out", "o", "--data", "a", "b", "--batch-size", "4", "--tokens",
                                "20M", "--compile", "--no-progress", "--no-tensorboard", "--resume", "--objective",
                                "distill", "--teacher", "t", "--lr", "1e-3", "--eval-batches", "5"])
    assert from_args(TrainConfig, args) == TrainConfig(
        model="m", out="o", data=["a", "b"], micro_batch_size=4, tokens="20M", compile=True, progress=False,
        tensorboard=False, resume=True, objective="distill", teacher="t", lr=1e-3, eval_batches=5)
    assert from_args(TrainConfig, parser().parse_args(["--model", "m", "--out", "o"])) == TrainConfig("m", "o")


def test_python_m_mlkv_training_and_the_package_names():
    result = subprocess.run([sys.executable, "-m", "mlkv.training", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)}, timeout=120)
    assert result.returncode == 0 and "--micro-batch-size" in result.stdout, result.stderr
    for name in mlkv.training.__all__:
        assert getattr(mlkv.training, name) is not None
    assert mlkv.training.train is importlib.import_module("mlkv.training.loop").train  # also under the old module path
