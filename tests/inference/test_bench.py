"""The inference benchmark on CPU: the max-batch search against fake allocators, outputs, argument errors."""

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlkv.inference.bench.run import (add_bench_arguments, find_max_batch, find_max_context, run_bench, run_bench_command,
                        search_max, time_full_step, weight_bytes)
from mlkv.model.config import preset_config
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


def fake_allocator(budget: int, overhead: int = 1000):
    """A device that holds ``budget`` bytes: weights + the producer-only cache + a fixed per-row overhead."""
    calls = []

    def try_fit(model, batch, context):
        calls.append((batch, context))
        cfg = model.config
        kv = cfg.sharing.kv_bytes_per_token(cfg.head_dim, next(model.parameters()).dtype)
        return weight_bytes(model) + batch * (context * kv + overhead) <= budget

    return try_fit, calls


def expected_max(model, budget, context=None, batch=None, overhead=1000):
    cfg = model.config
    kv = cfg.sharing.kv_bytes_per_token(cfg.head_dim, torch.float32)
    spare = budget - weight_bytes(model)
    if context is not None:
        return spare // (context * kv + overhead)
    return (spare // batch - overhead) // kv


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


def tiny_bench(tmp_path, **kw):
    config = preset_config("tiny-neox", max_position_embeddings=128)
    args = dict(plans=["mha", "2x1"], batches=[1, 3], prompt_len=6, new_tokens=5, step_context=24,
                step_batches=[2], step_tokens=4, context=64, context_batch=4, repeats=1, device="cpu",
                out_dir=tmp_path, progress=False, strict=True, print_table=False)
    return config, run_bench(config, **{**args, **kw})


def test_run_bench_cpu_outputs(tmp_path, capsys):
    budget = 2_000_000
    try_fit, _ = fake_allocator(budget)
    _, report = tiny_bench(tmp_path, try_fit=try_fit, budget_gb=budget / 1e9, print_table=True)
    assert [r["plan"] for r in report["plans"]] == ["MHA", "2x1"]
    assert report["meta"]["errors"] == []
    for r in report["plans"]:
        assert r["cache"]["kv_bytes_per_token_allocated"] == r["kv_bytes_per_token"]
        assert r["max_batch"]["max_batch"] == (budget - r["weight_bytes"]) // (64 * r["kv_bytes_per_token"] + 1000)
        assert r["max_context"]["max_context"] == ((budget - r["weight_bytes"]) // 4 - 1000) // r["kv_bytes_per_token"]
        for row in r["generate"]:
            assert row["agreement_vs_hf_static"] == 1.0  # fp32 on CPU: the same greedy tokens as transformers
            for impl in ("engine", "hf_dynamic", "hf_static"):
                assert row[impl]["step_ms"] > 0 and row[impl]["e2e_tok_s"] > 0
        (step,) = r["step"]
        assert step["hbm_bound_ms"] > 0 and step["engine"]["bound_ratio"] > 0
    # Fewer KV bytes per token, larger batches.
    assert report["plans"][1]["max_batch"]["max_batch"] > report["plans"][0]["max_batch"]["max_batch"]
    files = report["files"]
    data = json.loads(open(files["json"]).read())
    assert data["summary"].keys() == {"MHA", "2x1"}
    rows = list(csv.DictReader(open(files["csv"])))
    assert {r["impl"] for r in rows} == {"engine", "hf_dynamic", "hf_static"}
    assert len(rows) == 2 * 3 * 3  # plans x (2 generate + 1 step runs) x implementations
    for name in ("memory_vs_batch", "throughput_vs_batch", "max_batch"):
        assert open(files[name], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["bench"]["2x1"]["max_batch"] == report["plans"][1]["max_batch"]["max_batch"]
    assert any(line.lstrip().startswith("MHA") for line in out)


def test_run_bench_simulated_allocator_and_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["tiny-llama", "--plans", "mha", "mqa", "--batch", "2", "--prompt-len", "4",
                              "--new-tokens", "3", "--step-context", "16", "--step-batch", "1,2", "--step-tokens",
                              "3", "--context", "32", "--context-batch", "2", "--no-hf", "--device", "cpu",
                              "--repeats", "1", "--budget-gb", "0.01", "--out", str(tmp_path), "--no-progress",
                              "--bucket", "4"])
    assert run_bench_command(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["errors"] == []
    assert last["bench"]["MQA"]["max_batch"] > last["bench"]["MHA"]["max_batch"] > 0
    data = json.loads((tmp_path / "inference.json").read_text())
    assert data["meta"]["fit_method"].startswith("simulated")
    assert data["meta"]["settings"]["bucket"] == 4


@pytest.mark.parametrize("kw,match", [
    (dict(budget_gb=1e-6), r"budget \(1e-06 GB\) is smaller than the model weights \(.* GB"),
    (dict(budget_gb=-1), r"budget \(-1 GB\) must be positive"),
    (dict(context=4096), r"context \(4096\) is longer than max_position_embeddings \(128\)"),
    (dict(step_context=200), r"step context \(200\) is longer than max_position_embeddings \(128\)"),
    (dict(prompt_len=120, new_tokens=20), r"prompt length \+ new tokens \(140\) is longer than max_position"),
    (dict(batches=[0]), r"batch sizes \(0\) must be positive"),
    (dict(step_batches=["x"]), r"step batch sizes \('x'\) must be positive"),
    (dict(plans=["mlkv-99"]), r"ambiguous or impossible"),
    (dict(dtype="int8"), r"dtype \('int8'\) must be one of"),
    (dict(bucket=0), r"bucket \(0\) must be a positive number of cache columns"),
])
def test_argument_errors(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_bench(tmp_path, **kw)
    assert not (tmp_path / "inference.json").exists()  # checked before anything runs


def test_a_config_without_weights_benchmarks_its_shape(tmp_path):
    """A folder with only config.json (e.g. a reproduction's base_config) is benchmarked with random weights;
    with weights its own plan would load them."""
    from mlkv.inference.bench.run import _base

    from tiny import tiny_config

    tiny_config().save_pretrained(tmp_path)
    config, loaded, source = _base(tmp_path)
    assert loaded is None and "no weights: random" in source and config.num_hidden_layers == 4
    tiny_model().save_pretrained(tmp_path)
    assert _base(tmp_path)[1] == tmp_path


def test_unknown_model():
    with pytest.raises(ValueError, match="neither a preset"):
        run_bench("no-such-model", device="cpu", progress=False)


def test_time_full_step_runs_a_full_context_step():
    """The decode-at-max-batch timing: a full-context greedy step at the given batch, with no cache growth."""
    model = tiny_model("gpt_neox", "mqa")
    r = time_full_step(model, 3, 20, "cpu", iters=2)
    assert r["batch"] == 3 and r["context"] == 20 and r["step_ms"] > 0
    assert r["decode_tok_s"] == pytest.approx(3 / (r["step_ms"] / 1e3))


def test_time_at_max_batch_backs_off_after_out_of_memory(monkeypatch):
    """At the allocator's edge the timed step may not fit: each OOM retries at 95% of the batch, and the result
    names both the batch timed and the search's max batch; an OOM on every try is raised."""
    import mlkv.inference.bench.run as bench

    tried = []

    def fake_step(model, batch, context, device):
        tried.append(batch)
        if batch > 900:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"batch": batch, "context": context, "step_ms": 1.0, "decode_tok_s": batch * 1e3}

    monkeypatch.setattr(bench, "time_full_step", fake_step)
    r = bench.time_at_max_batch(None, 1000, 64, "cpu")
    assert tried == [1000, 950, 902, 856] and r["batch"] == 856 and r["max_batch"] == 1000 and r["backoffs"] == 3
    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):
        bench.time_at_max_batch(None, 5000, 64, "cpu", tries=2)
    assert tried == [5000, 4750]

    def broken_step(model, batch, context, device):  # not an out-of-memory error: no retry
        tried.append(batch)
        raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")

    tried.clear()
    monkeypatch.setattr(bench, "time_full_step", broken_step)
    with pytest.raises(RuntimeError, match="EXECUTION_FAILED"):
        bench.time_at_max_batch(None, 1000, 64, "cpu")
    assert tried == [1000]


def test_compile_times_generate_and_step_rows(tmp_path, monkeypatch, capsys):
    """--compile times the compiled engine on the generate and step rows up to compile_max_batch, on the rows' own
    prompts, and rates the step rows against the same HBM bound as the other paths. The compiled run itself is
    faked (inductor on CPU takes minutes): what is tested is the plumbing."""
    import mlkv.inference.bench.run as bench

    real_run, eager_prompts, compiled_calls = bench._engine_run, [], []

    def engine_run(model, prompts, new_tokens, repeats, device, engine_kwargs):
        if not engine_kwargs.get("compile"):
            eager_prompts.append(prompts.clone())
            return real_run(model, prompts, new_tokens, repeats, device, engine_kwargs)
        compiled_calls.append((prompts.clone(), new_tokens, engine_kwargs))
        B = prompts.shape[0]
        return {"step_ms": 0.25, "decode_tok_s": B * 4e3, "e2e_tok_s": B * 3e3, "prefill_tok_s": 1e5,
                "peak_bytes": None, "cache_bytes": 0, "compiled": True, "tokens": torch.zeros(B, new_tokens)}

    monkeypatch.setattr(bench, "_engine_run", engine_run)
    _, report = tiny_bench(tmp_path, plans=["mha"], step_batches=[2, 5], compile=True, compile_max_batch=2,
                           bucket=8, search=False, print_table=True)
    (r,) = report["plans"]
    assert [(run, row["batch"]) for run in ("generate", "step") for row in r[run]
            if "engine_compiled" in row] == [("generate", 1), ("step", 2)]
    (gen1, _), (step2, step5) = r["generate"], r["step"]
    (g_prompts, g_new, g_kw), (s_prompts, s_new, s_kw) = compiled_calls
    assert g_kw == s_kw == {"compile": True, "bucket": 8}
    assert (g_prompts.shape, g_new) == ((1, 6), 5) and (s_prompts.shape, s_new) == ((2, 20), 4)  # 24 - 4 tokens
    assert torch.equal(g_prompts, eager_prompts[0]) and torch.equal(s_prompts, eager_prompts[2])  # rows' prompts
    c = step2["engine_compiled"]
    assert c["bound_ratio"] == pytest.approx(0.25 / step2["hbm_bound_ms"])
    assert c["bandwidth_fraction"] == pytest.approx(step2["hbm_bound_ms"] / 0.25)
    assert step2["compiled_step_speedup_vs_engine"] == pytest.approx(step2["engine"]["step_ms"] / 0.25)
    assert step2["compiled_step_speedup_vs_hf_static"] == pytest.approx(step2["hf_static"]["step_ms"] / 0.25)
    assert gen1["compiled_step_speedup_vs_hf_static"] == pytest.approx(gen1["hf_static"]["step_ms"] / 0.25)
    assert "bound_ratio" not in gen1["engine_compiled"] and "engine_compiled" not in step5
    s = report["summary"]["MHA"]
    assert s["step_b2_ctx24_compiled_ms"] == 0.25 and "step_b5_ctx24_compiled_ms" not in s
    assert s["step_b2_compiled_bound_ratio"] == pytest.approx(c["bound_ratio"], rel=1e-3)
    assert s["step_b2_compiled_speedup_vs_engine"] == pytest.approx(step2["compiled_step_speedup_vs_engine"], 1e-3)
    rows = [row for row in csv.DictReader(open(report["files"]["csv"])) if row["impl"] == "engine_compiled"]
    assert [(row["run"], row["batch"]) for row in rows] == [("generate", "1"), ("step", "2")]
    assert float(rows[1]["bound_ratio"]) == pytest.approx(c["bound_ratio"], rel=1e-4)
    assert rows[0]["bound_ratio"] == ""
    header = next(line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("plan"))
    assert "cmp b1 ms" in header and "ctx-cmp b2 ms" in header and "ctx-cmp b5 ms" not in header


def test_compile_deadline_skips_compiled_runs(tmp_path, monkeypatch):
    import mlkv.inference.bench.run as bench

    monkeypatch.setattr(bench, "COMPILE_RESERVE_S", 1e9)
    _, report = tiny_bench(tmp_path, plans=["mha"], compile=True, compile_max_batch=4, deadline_s=1e6,
                           search=False, hf=False)
    (r,) = report["plans"]
    assert r["skipped"] == ["compiled engine (deadline)"]
    assert not any("engine_compiled" in row for run in ("generate", "step") for row in r[run])


def test_profile_decode_cpu_smoke(tmp_path):
    """benchmarks/profile_decode.py on CPU (a tiny 12x12 model, CPU op times): a table, then one JSON line."""
    out = tmp_path / "profile.json"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_decode.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--new-tokens", "5", "--top", "4",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert last["steps"] == 4 and last["compiled"] is False and last["plan"] == "MHA-144"
    assert last["step_ms"] > 0 and last["kernel_ms_per_step"] > 0 and last["kernels_per_step"] > 1
    assert 0 < last["busy_fraction"] < 1.05  # op self times over the profiled wall time
    assert len(last["top"]) == 4 and set(last["top"][0]) == {"name", "count", "total_us", "mean_us"}
    totals = [k["total_us"] for k in last["top"]]
    assert totals == sorted(totals, reverse=True)
