"""The reproduction's report from its results: rows, the paper's findings and the distillation gap computed by
their stated rules, and every section rendered (the inference one only runs on a GPU, so it is checked here on
made-up numbers, as are the findings)."""

import pytest

from mlkv.evaluation.results import average_accuracy
from mlkv.reproduce.config import Settings, resolve_settings
from mlkv.reproduce.findings import CHANCE_AVERAGE, collapse, distillation_gap, in_layer, kv_order, paper_findings
from mlkv.reproduce.markdown import render_report
from mlkv.reproduce.report import init_comparison, published_comparison, published_key, report_rows, summarize

ACCS = {"arc_easy": 0.5, "lambada_openai": 0.25, "piqa": 0.625, "sciq": 0.75, "hellaswag": 0.3}
SMOL = dict(spec="smollm2", kind="gguf", layers=30, heads=9, kv_heads=3, head_dim=64)


def _evaluation(accs=ACCS, ppl=40.5):
    results = {task: {"acc,none": acc, "acc_norm,none": acc + 0.01} for task, acc in accs.items()}
    results["lambada_openai"]["perplexity,none"] = 123.45
    return {"results": results, "mlkv": {"perplexity": {"gutenberg_val": {"token_level": {"perplexity": ppl}}}}}


def _flat(acc: float, ppl: float) -> dict:
    """An evaluation scoring ``acc`` on each of the paper's four tasks (so its average is ``acc``)."""
    return _evaluation({t: acc for t in ("arc_easy", "lambada_openai", "piqa", "sciq")}, ppl)


def test_summary_row_uses_the_evaluations_average_of_the_paper_tasks():
    row = summarize("MLKV-6-lm", _evaluation())
    assert row["avg_paper4"] == average_accuracy(_evaluation()) == (0.5 + 0.25 + 0.625 + 0.75) / 4
    assert (row["lambada_acc"], row["lambada_ppl"], row["hellaswag_acc_norm"]) == (0.25, 123.45, 0.31)
    partial = summarize("x", _evaluation({k: v for k, v in ACCS.items() if k != "sciq"}))
    assert partial["avg_paper4"] is None and partial["wikitext_word_ppl"] is None


@pytest.fixture
def smol_run():
    s = resolve_settings(Settings(out="x", base="smollm2", source=SMOL, plans=["30x3", "10x3", "30x1", "6x1", "1x1"],
                                  distill_plans=["6x1", "10x3"]))
    evals = {"base": _flat(0.50, 30.0), "6x1-step0": _flat(0.26, 30000.0), "30x3-lm": _flat(0.48, 20.0),
             "10x3-lm": _flat(0.40, 50.0), "30x1-lm": _flat(0.42, 40.0), "6x1-lm": _flat(0.36, 60.0),
             "1x1-lm": _flat(0.27, 200.0), "6x1-distill": _flat(0.42, 40.0), "10x3-distill": _flat(0.39, 52.0)}
    rows = report_rows(evals, s)
    return s, rows, {r["run"]: r for r in rows}


def test_rows_state_plan_init_stage_and_kv_size_at_the_originals_shape(smol_run):
    s, rows, by_run = smol_run
    assert (by_run["base"]["config"], by_run["base"]["init"], by_run["base"]["stage"]) == ("30x3", None, "original")
    assert by_run["base"]["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2 == 23040
    six = by_run["6x1-step0"]
    assert (six["stage"], six["init"], six["kv_bytes_per_token"], six["producers"]) == ("step 0", "pairwise", 1536, 6)
    assert by_run["6x1-distill"]["stage"] == "distill" and by_run["10x3-lm"]["kv_bytes_per_token"] == 7680


def test_findings_follow_their_rules(smol_run):
    s, rows, by_run = smol_run
    f = paper_findings(s, by_run)
    # 10x3 and 30x1 have the same KV size: 4 sizes, 9 pairs of different size, all with the larger cache ahead
    assert (f["kv_order"]["verdict"], f["kv_order"]["agree"], f["kv_order"]["pairs"]) == ("holds", 9, 9)
    pair = f["in_layer"]["pairs"][0]
    assert (pair["in_layer"], pair["cross_layer"], pair["holds"], f["in_layer"]["verdict"]) == \
        ("30x1", "10x3", True, "holds")
    margin = (0.27 - CHANCE_AVERAGE) / (0.48 - CHANCE_AVERAGE)
    assert f["collapse"]["verdict"] == "holds (1x1 collapses)" and f["collapse"]["margin_kept"] == pytest.approx(margin)


def test_findings_that_fail_or_lack_runs_say_so():
    rows = {"a": {"kv_bytes_per_token": 100, "avg_paper4": 0.3, "gutenberg_ppl": 9, "producers": 4, "kv_heads": 4},
            "b": {"kv_bytes_per_token": 50, "avg_paper4": 0.4, "gutenberg_ppl": 8, "producers": 2, "kv_heads": 2}}
    assert kv_order(rows)["verdict"] == "does not hold" and kv_order({})["verdict"] == "not measured"
    assert in_layer(rows)["verdict"] == "not measured"  # no two plans of one size
    assert collapse(rows, None)["verdict"] == "not measured"
    one = {"config": "1x1", "producers": 1, "kv_heads": 1, "avg_paper4": 0.25, "gutenberg_ppl": 99}
    at_chance = {"avg_paper4": 0.26, "gutenberg_ppl": 90}
    assert collapse({"1x1": one}, at_chance)["verdict"].startswith("not measurable")


def test_distillation_gap_is_the_fraction_closed_in_accuracy_and_perplexity(smol_run):
    s, rows, by_run = smol_run
    gap = distillation_gap(s, by_run)
    acc, ppl = gap["6x1"]["avg_paper4"], gap["6x1"]["gutenberg_ppl"]
    assert acc["control"]["fraction_closed"] == pytest.approx((0.42 - 0.36) / (0.48 - 0.36))  # half
    assert ppl["control"]["fraction_closed"] == pytest.approx((40 - 60) / (20 - 60))
    assert ppl["original"]["fraction_closed"] == pytest.approx((40 - 60) / (30 - 60))
    assert gap["10x3"]["avg_paper4"]["control"]["fraction_closed"] < 0  # distill did worse than lm


def _results(s, rows, by_run, **extra):
    return {"settings": {**s.__dict__}, "rows": rows, "findings": paper_findings(s, by_run),
            "distillation_gap": distillation_gap(s, by_run), "init_comparison": init_comparison(s, by_run),
            "published": published_comparison(s, by_run), "bench": None, "seconds": 600.0, "command": "mlkv reproduce",
            "git_commit": "abc", "card": "H200", "disk_bytes": 3.2e9, **extra}


def test_report_renders_step_0_uptrained_findings_gap_and_published(smol_run):
    s, rows, by_run = smol_run
    text = render_report(_results(s, rows, by_run, eval_dtype="bfloat16"))
    assert "- disk: 3.20 GB in the run folder (finished runs keep their final model only)" in text
    assert "- evaluation dtype: bfloat16; zero-shot tasks: full sets;" in text
    assert "- evaluation dtype: the checkpoints' own dtype;" in render_report(_results(s, rows, by_run))  # older results
    assert "## The original and its conversions before training (step 0)" in text
    assert "| 6x1-step0 | 6x1 | pairwise | 6 | 1,536 | 30,000.00 |" in text
    assert "| base | 30x3 | (original) | 90 | 23,040 | 30.00 |" in text
    assert "| 6x1-distill | 6x1 | pairwise | 6 | 1,536 | 40.00 |" in text
    assert "Accuracy falls as KV shrinks: **holds**. In 9 of 9 pairs" in text
    assert "in-layer sharing is at least as accurate as cross-layer: **holds**. 30x1 42.00%" in text
    assert "1x1 collapses" in text and "**holds (1x1 collapses)**. 1x1 scores 27.00% against 48.00%" in text
    assert "| 6x1 | avg acc, paper's 4 | control | 50.0% | 48.00 | 36.00 | 42.00 |" in text
    assert "| arc_easy_acc | 50.00 | 54.12 | -4.12 | no |" in text
    assert "| piqa_acc_norm | 51.00 | 66.92 | -15.92 | no |" in text
    assert "| hellaswag_acc_norm | - | 42.99 | - | not measured |" in text  # no HellaSwag in this run
    assert "Published: third-party: the Hugging Face Hub model page lldois/SmolLM2-135M-Reasoning-SLERP-Champion" in text


def test_published_scores_are_compared_in_points_with_a_tolerance(smol_run):
    s, rows, by_run = smol_run
    close = {**by_run, "base": {**by_run["base"], "arc_easy_acc": 0.5612}}
    arc = published_comparison(s, close)["comparison"][0]
    assert arc["score"] == "arc_easy_acc" and arc["difference_points"] == pytest.approx(2.0)
    assert arc["within_tolerance"] is True
    assert published_comparison(Settings(out="x", base="pretrain"), by_run) is None
    # the device chain passes the GGUF's path: the file's model name finds the same entry
    assert published_key("/root/SmolLM2-135M-Instruct.Q4_1.gguf") == published_key("smollm2") == "smollm2-135m"


def test_report_bench_section_and_skipped_inits():
    s = resolve_settings(Settings(out="x", base="smollm2", source=SMOL, plans=["30x3", "15x1"], init_plans=["15x1"],
                                  init_comparison=["mean", "first"]))
    evals = {"base": _flat(0.5, 30.0), "15x1-lm": _flat(0.4, 50.0), "15x1-lm-first": _flat(0.4, 49.0)}
    rows = report_rows(evals, s)
    by_run = {r["run"]: r for r in rows}
    bench = {"meta": {"device_name": "H200", "dtype": "bf16", "settings": {"context": 2048}, "source": "lm runs",
                      "errors": ["CUDA out of memory. Tried to allocate 2 GiB. More text."]},
             "summary": {"15x1": {"kv_bytes_per_token": 3840, "gen_b1_step_ms": 1.23456, "gen_b64_step_ms": 2.5,
                                  "max_batch": 1024, "max_batch_decode_tok_s": 123456.7,
                                  "max_batch_decode_batch": 512}},
             "plans": [{"plan": "1x1", "skipped": ["hf"]}]}
    text = render_report(_results(s, rows, by_run, bench=bench))
    assert "- 15x1: `mean` skipped, the same function as pairwise on 15x1 (no producer serves more than two" in text
    assert "| 15x1 | 50.00 (mean 50.00; step 0 -) | 49.00 (mean 49.00; step 0 -) | first |" in text
    assert "| 15x1 | 3,840 | 1.235 | 2.500 | 1,024 | 123,457 (at batch 512) |" in text
    assert "max batch @ ctx 2048" in text and "Benchmark errors: CUDA out of memory" in text
    assert "Skipped: 1x1: hf" in text
