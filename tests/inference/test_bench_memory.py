"""The benchmark's memory search: search_max, and the max batch / context against fake and real allocators."""

import pytest
import torch

from bench_fakes import expected_max, fake_allocator
from mlkv.inference.bench.memory import (cuda_try_fit, find_max_batch, find_max_context, search_max, set_budget,
                                         step_activation_bytes, weight_bytes)
from mlkv.inference.engine import MLKVEngine
from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("answer", [0, 1, 2, 7, 100, 1023, 4096, 99_999])
@pytest.mark.parametrize("guess", [1, 5, 1000, 10**6])
def test_search_max_finds_the_limit(answer, guess):
    probed = []

    def fits(n):
        probed.append(n)
        return n <= answer

    n, probes = search_max(fits, guess)
    assert n == answer
    assert probes == len(set(probed)) <= 2 * 20 + 4  # gallop + bisection: logarithmic
    assert all(p >= 1 for p in probed)


def test_search_max_respects_the_limit():
    probed = []
    n, _ = search_max(lambda b: probed.append(b) or True, guess=10, limit=300)
    assert n == 300 and max(probed) == 300
    assert search_max(lambda b: b <= 40, guess=1000, limit=64)[0] == 40
    with pytest.raises(ValueError, match="limit"):
        search_max(lambda b: True, limit=0)


@pytest.mark.parametrize("plan", ["mha", "mqa", "2x1", [0, 0, 2, 2]], ids=str)
def test_max_batch_and_context_against_fake_allocator(plan):
    model = tiny_model("gpt_neox", plan)
    budget = weight_bytes(model) + 3_000_000
    try_fit, calls = fake_allocator(budget)
    got = find_max_batch(model, 100, try_fit, budget)
    assert got["max_batch"] == expected_max(model, budget, context=100)
    assert got["probes"] == len(set(calls)) < 30
    assert {c for _, c in calls} == {100}
    got = find_max_context(model, 8, try_fit, budget)
    assert got["max_context"] == expected_max(model, budget, batch=8)
    assert got["beyond_max_position"] == (got["max_context"] > model.config.max_position_embeddings)


# ---- on a CUDA device (pytest -m gpu): the real allocator -----------------------------------------------------------
@pytest.mark.gpu
def test_cuda_max_batch_under_a_budget():
    model = tiny_model("gpt_neox", "MHA-144", layers=12, heads=12, hidden_size=48).cuda()
    context, spare = 512, 64 << 20
    card = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    budget = torch.cuda.memory_allocated() + spare
    set_budget("cuda", budget, card)
    try:
        got = find_max_batch(model, context, cuda_try_fit(), budget)["max_batch"]
    finally:
        set_budget("cuda", None, card)
    per_row = MLKVEngine.buffer_bytes(model.config, 1, context, torch.float32)
    assert got * per_row <= spare  # the cache alone must fit
    assert got >= 0.5 * spare / (per_row + step_activation_bytes(model.config, 1, torch.float32))
