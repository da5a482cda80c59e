"""The optimizer's schedule and the metrics' FLOPs count (mlkv.training.runtime, mlkv.training.metrics)."""

from __future__ import annotations

import pytest
import torch

from mlkv.training import model_flops_per_token
from mlkv.training.runtime import WarmupCosine, compile_enabled
from tiny import tiny_model


def test_schedule():
    sched = WarmupCosine(total_steps=10, warmup_ratio=0.2, min_ratio=0.1)
    factors = [sched(s) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]  # warmup of ceil(0.2 * 10) = 2 steps
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))



def test_flops_per_token():
    model = tiny_model(layers=2)  # hidden 32, 4 heads, vocab 96, untied
    n = sum(p.numel() for p in model.parameters()) - 96 * 32
    assert model_flops_per_token(model, 128) == 6 * n + 12 * 2 * 32 * 128



def test_compile_is_on_by_default_on_cuda_only_and_a_given_flag_wins():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_enabled(None, cuda) and not compile_enabled(None, cpu)
    assert compile_enabled(True, cpu) and not compile_enabled(False, cuda)
