"""The reproduction's report from its results: the paper's average is the evaluation's, and every section renders
(the inference one only runs on a GPU, so it is checked here on made-up numbers)."""

from mlkv.evaluation.results import average_accuracy
from mlkv.reproduce.report import render_report, summarize

ACCS = {"arc_easy": 0.5, "lambada_openai": 0.25, "piqa": 0.625, "sciq": 0.75, "hellaswag": 0.3}


def _evaluation(accs=ACCS):
    results = {task: {"acc,none": acc, "acc_norm,none": acc + 0.01} for task, acc in accs.items()}
    results["lambada_openai"]["perplexity,none"] = 123.45
    return {"results": results, "mlkv": {"perplexity": {"gutenberg_val": {"token_level": {"perplexity": 40.5}}}}}


def test_summary_row_uses_the_evaluations_average_of_the_paper_tasks():
    row = summarize("MLKV-6-lm", _evaluation())
    assert row["avg_paper4"] == average_accuracy(_evaluation()) == (0.5 + 0.25 + 0.625 + 0.75) / 4
    assert (row["lambada_acc"], row["lambada_ppl"], row["hellaswag_acc_norm"]) == (0.25, 123.45, 0.31)
    partial = summarize("x", _evaluation({k: v for k, v in ACCS.items() if k != "sciq"}))
    assert partial["avg_paper4"] is None and partial["wikitext_word_ppl"] is None


def test_render_report_sections():
    row = {**summarize("MLKV-6-lm", _evaluation()), "config": "MLKV-6", "structure": "6x1", "kv_heads": 6,
           "kv_bytes_per_token": 1536}
    results = {
        "settings": {"smoke": False, "base": None, "hidden_size": 384, "base_tokens": "30M", "uptrain_tokens": "4M",
                     "seq_len": 1024, "limit": None, "distill_hidden": 10.0, "uptrain_lr": 6e-4},
        "rows": [row], "seconds": 600.0, "command": "mlkv reproduce", "git_commit": "abc", "card": "H200",
        "distillation_gap": {"base": {"reference_ppl": 30.0, "lm_ppl": 40.0, "distill_ppl": 36.0,
                                      "fraction_closed": 0.4}},
        "init_comparison": {"MLKV-6": {"inits": {"mean": {"ppl": [40.5, 41.5], "mean": 41.0}}, "best": "mean"}},
        "bench": {"meta": {"device_name": "H200", "dtype": "bf16", "settings": {"context": 2048},
                           "errors": ["CUDA out of memory. Tried to allocate 2 GiB. More text."]},
                  "summary": {"MLKV-6": {"kv_bytes_per_token": 1536, "gen_b1_step_ms": 1.23456, "gen_b64_step_ms": 2.5,
                                         "max_batch": 1024, "max_batch_decode_tok_s": 123456.7,
                                         "max_batch_decode_batch": 512}},
                  "plans": [{"plan": "MLKV-1", "skipped": ["hf"]}]},
    }
    text = render_report(results)
    assert "| MLKV-6-lm | MLKV-6 (6x1) | 6 | 1,536 | 40.50 | - | 50.00 | 25.00 (123.5) | 62.50 | 75.00 | 31.00 | " \
           "53.12 |" in text
    assert "distillation closes 40.0% of the gap" in text
    assert "| MLKV-6 | 40.50, 41.50 (mean 41.00) | - | - | mean |" in text
    assert "| MLKV-6 | 1,536 | 1.235 | 2.500 | 1,024 | 123,457 (at batch 512) |" in text
    assert "max batch @ ctx 2048" in text and "Benchmark errors: CUDA out of memory" in text
    assert "Skipped: MLKV-1: hf" in text
