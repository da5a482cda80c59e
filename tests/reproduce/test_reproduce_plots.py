"""The plots a reproduction writes: losses of different kinds on their own panels, the same look for a run in every
panel, and a benchmark legend that names only the lines drawn."""

import json

from mlkv.inference.bench.report import throughput_styles, write_plots
from mlkv.reproduce.plots import loss_curves, plot_pareto, plot_uptrain_loss


def _run(folder, records):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _losses(distill: bool, val: bool = True):
    records = []
    for step in (1, 2, 3, 4):
        r = {"step": step, "loss": 6.0 - step / 4, "lm_loss": 6.0 - step / 4, "tokens": 256 * step}
        if distill:
            r.update(loss=0.3 - step / 40, kl=0.2, hidden=0.01)
        records.append(r)
        if val and step % 2 == 0:
            records.append({"step": step, "val_loss": 5.0, "val_ppl": 150.0 - step, "val_tokens": 512})
    return records


def test_loss_kinds_are_split_and_validation_kept_for_the_recovery_panel(tmp_path):
    dirs = {"6x1-lm": _run(tmp_path / "a", _losses(False)), "6x1-distill": _run(tmp_path / "b", _losses(True)),
            "30x3-lm": _run(tmp_path / "c", _losses(False, val=False)), "empty": tmp_path / "none"}
    curves = loss_curves(dirs)
    assert set(curves["lm"]) == {"6x1-lm", "30x3-lm"} and set(curves["distill"]) == {"6x1-distill"}
    assert curves["distill"]["6x1-distill"][0] == (256, 0.3 - 1 / 40)  # the objective, not the CE
    assert set(curves["val_ppl"]) == {"6x1-lm", "6x1-distill"}  # at least two validation points each
    assert curves["val_ppl"]["6x1-lm"] == [(512, 148.0), (1024, 146.0)]  # steps -> tokens
    assert plot_uptrain_loss(dirs, tmp_path / "loss.png").stat().st_size > 10_000


def test_pareto_draws_with_and_without_task_scores(tmp_path):
    rows = [{"run": "base", "stage": "original", "main": True, "config": "30x3", "kv_bytes_per_token": 23040,
             "avg_paper4": 0.5, "gutenberg_ppl": 30.0},
            {"run": "6x1-lm", "stage": "lm", "main": True, "config": "6x1", "kv_bytes_per_token": 1536,
             "avg_paper4": None, "gutenberg_ppl": 60.0}]
    assert plot_pareto(rows, tmp_path / "p.png").stat().st_size > 10_000


def test_the_benchmark_legend_names_only_the_implementations_measured(tmp_path):
    def plan(name, impls):
        rows = [{"batch": b, **{i: {"decode_tok_s": 100.0 * b, "peak_bytes": 2**30, "cache_bytes": 2**20}
                                for i in impls}} for b in (1, 64)]
        return {"plan": name, "step": rows, "weight_bytes": 2**28}

    engine_only = [plan("30x3", ["engine"]), plan("6x1", ["engine"])]
    assert [text for _, _, text in throughput_styles(engine_only)] == ["mlkv engine"]
    with_hf = [plan("30x3", ["engine", "hf_static"])]
    assert throughput_styles(with_hf) == [("-", "o", "mlkv engine"),
                                          ("--", "x", "transformers generate(), static cache")]
    meta = {"device_name": "NVIDIA H200", "dtype": "bfloat16", "settings": {"step_context": 1024}}
    files = write_plots({"meta": meta, "plans": engine_only}, tmp_path)
    assert set(files) == {"memory_vs_batch", "throughput_vs_batch"}
