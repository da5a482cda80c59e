"""run_bench on CPU: outputs, argument errors, the compiled-engine plumbing; benchmarks/profile_decode.py."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mlkv.inference.bench.run as bench
from bench_fakes import fake_allocator
from mlkv.inference.bench.models import resolve_model
from mlkv.inference.bench.run import run_bench
from mlkv.model.config import preset_config
from tiny import tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bench(tmp_path, **kw):
    config = preset_config("tiny-neox", max_position_embeddings=128)
    args = dict(plans=["mha", "2x1"], batch=[1, 3], prompt_len=6, new_tokens=5, step_context=24,
                step_batch=[2], step_tokens=4, context=64, context_batch=4, repeats=1, device="cpu",
                out=tmp_path, progress=False, strict=True, print_table=False)
    return config, run_bench(config, **{**args, **kw})


@pytest.mark.slow
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


@pytest.mark.parametrize("kw,match", [
    (dict(budget_gb=1e-6), r"budget \(1e-06 GB\) is smaller than the model weights \(.* GB"),
    (dict(budget_gb=-1), r"budget \(-1 GB\) must be positive"),
    (dict(context=4096), r"context \(4096\) is longer than max_position_embeddings \(128\)"),
    (dict(step_context=200), r"step context \(200\) is longer than max_position_embeddings \(128\)"),
    (dict(prompt_len=120, new_tokens=20), r"prompt length \+ new tokens \(140\) is longer than max_position"),
    (dict(batch=[0]), r"batch sizes \(0\) must be positive"),
    (dict(step_batch=["x"]), r"step batch sizes \('x'\) must be positive"),
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
    tiny_config().save_pretrained(tmp_path)
    config, loaded, source = resolve_model(tmp_path)
    assert loaded is None and "no weights: random" in source and config.num_hidden_layers == 4
    tiny_model().save_pretrained(tmp_path)
    assert resolve_model(tmp_path)[1] == tmp_path


def test_unknown_model():
    with pytest.raises(ValueError, match="neither a preset"):
        run_bench("no-such-model", device="cpu", progress=False)


@pytest.mark.slow
def test_compile_times_generate_and_step_rows(tmp_path, monkeypatch, capsys):
    """--compile times the compiled engine on the generate and step rows up to compile_max_batch, on the rows' own
    prompts, and rates the step rows against the same HBM bound as the other paths. The compiled run itself is
    faked (inductor on CPU takes minutes): what is tested is the plumbing."""
    real_run, eager_prompts, compiled_calls = bench.engine_run, [], []

    def engine_run(model, prompts, new_tokens, repeats, device, engine_kwargs):
        if not engine_kwargs.get("compile"):
            eager_prompts.append(prompts.clone())
            return real_run(model, prompts, new_tokens, repeats, device, engine_kwargs)
        compiled_calls.append((prompts.clone(), new_tokens, engine_kwargs))
        B = prompts.shape[0]
        return {"step_ms": 0.25, "decode_tok_s": B * 4e3, "e2e_tok_s": B * 3e3, "prefill_tok_s": 1e5,
                "peak_bytes": None, "cache_bytes": 0, "compiled": True, "tokens": torch.zeros(B, new_tokens)}

    monkeypatch.setattr(bench, "engine_run", engine_run)
    _, report = tiny_bench(tmp_path, plans=["mha"], step_batch=[2, 5], compile=True, compile_max_batch=2,
                           bucket=8, search=False, print_table=True)
    (r,) = report["plans"]
    assert [(run, row["batch"]) for run in ("generate", "step") for row in r[run]
            if "engine_compiled" in row] == [("generate", 1), ("step", 2)]
    (gen1, _), (step2, step5) = r["generate"], r["step"]
    (g_prompts, g_new, g_kw), (s_prompts, s_new, s_kw) = compiled_calls
    assert g_kw == s_kw == {"compile": True, "bucket": 8, "decode_attention": "sdpa"}
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


@pytest.mark.slow
def test_compile_deadline_skips_compiled_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "COMPILE_RESERVE_S", 1e9)
    _, report = tiny_bench(tmp_path, plans=["mha"], compile=True, compile_max_batch=4, deadline_s=1e6,
                           search=False, hf=False)
    (r,) = report["plans"]
    assert r["skipped"] == ["compiled engine (deadline)"]
    assert not any("engine_compiled" in row for run in ("generate", "step") for row in r[run])


@pytest.mark.slow
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


def test_the_package_exports_the_public_names():
    import mlkv.inference.bench as pkg
    from mlkv.inference.bench.measure import time_full_step
    from mlkv.inference.bench.settings import BenchSettings

    assert pkg.run_bench is run_bench and pkg.BenchSettings is BenchSettings and pkg.time_full_step is time_full_step
    assert set(pkg.__all__) <= set(dir(pkg))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pkg.nothing  # noqa: B018
