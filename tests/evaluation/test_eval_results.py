"""Result files and tables (``mlkv.evaluation.results``) and what a result records about its model."""

import json

from transformers import GPTNeoXConfig

from mlkv.evaluation.model_info import kv_cache_info


def test_kv_bytes_per_token_matches_paper_table():
    pythia = GPTNeoXConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
    assert kv_cache_info(pythia)["bytes_per_token"] == 36_864
    from mlkv import preset_config

    for plan, expected in [("mha-144", 36_864), ("gqa-48", 12_288), ("mlkv-48", 12_288), ("mlkv-12", 3_072),
                           ("mlkv-6", 1_536), ("mlkv-1", 256)]:
        assert kv_cache_info(preset_config("pythia-160m", plan=plan))["bytes_per_token"] == expected, plan


def test_every_compare_column_names_its_metric_and_hellaswag_shows_acc_norm(tmp_path):
    from mlkv.evaluation.results import column_header, column_value, compare, compare_rows

    saved = tmp_path / "a.json"
    saved.write_text(json.dumps({"results": {"hellaswag": {"acc,none": 0.25, "acc_norm,none": 0.5},
                                             "piqa": {"acc,none": 0.75, "acc_norm,none": 0.125}},
                                 "mlkv": {"name": "a"}}))
    header, _, row = compare([saved]).splitlines()
    assert header == ("| config | KV bytes/token | ARC-e acc | LAMBADA acc (ppl) | PIQA acc | SciQ acc | "
                      "HellaSwag acc_norm | avg of 4 (acc) |")
    assert row == "| a | - | - | - | 75.00 | - | 50.00 | - |"
    assert compare_rows([saved])[0]["hellaswag_acc_norm"] == 0.5 and "hellaswag" not in compare_rows([saved])[0]
    results = json.loads(saved.read_text())
    assert column_value(results, "hellaswag") == 0.5 and column_header("hellaswag") == "HellaSwag acc_norm"
    assert column_value(results, "piqa") == 0.75 and column_header("boolq") == "boolq acc"
