"""The benchmark's timing: a full-context decode step at a batch, and its out-of-memory back-off."""

import pytest
import torch

import mlkv.inference.bench.measure as measure
from mlkv.inference.bench.measure import time_full_step
from tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_time_full_step_runs_a_full_context_step():
    """The decode-at-max-batch timing: a full-context greedy step at the given batch, with no cache growth."""
    model = tiny_model("gpt_neox", "mqa")
    r = time_full_step(model, 3, 20, "cpu", iters=2)
    assert r["batch"] == 3 and r["context"] == 20 and r["step_ms"] > 0
    assert r["decode_tok_s"] == pytest.approx(3 / (r["step_ms"] / 1e3))


def test_time_at_max_batch_backs_off_after_out_of_memory(monkeypatch):
    """At the allocator's edge the timed step may not fit: each OOM retries at 95% of the batch, and the result
    names both the batch timed and the search's max batch; an OOM on every try is raised."""
    tried = []

    def fake_step(model, batch, context, device, decode_attention="sdpa"):
        tried.append(batch)
        if batch > 900:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"batch": batch, "context": context, "step_ms": 1.0, "decode_tok_s": batch * 1e3}

    monkeypatch.setattr(measure, "time_full_step", fake_step)
    r = measure.time_at_max_batch(None, 1000, 64, "cpu")
    assert tried == [1000, 950, 902, 856] and r["batch"] == 856 and r["max_batch"] == 1000 and r["backoffs"] == 3
    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):
        measure.time_at_max_batch(None, 5000, 64, "cpu", tries=2)
    assert tried == [5000, 4750]

    def broken_step(model, batch, context, device, decode_attention="sdpa"):  # not an out-of-memory error: no retry
        tried.append(batch)
        raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")

    tried.clear()
    monkeypatch.setattr(measure, "time_full_step", broken_step)
    with pytest.raises(RuntimeError, match="EXECUTION_FAILED"):
        measure.time_at_max_batch(None, 1000, 64, "cpu")
    assert tried == [1000]
