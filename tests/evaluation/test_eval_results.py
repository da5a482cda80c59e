"""Result files and tables (``mlkv.evaluation.results``) and what a result records about its model."""

from transformers import GPTNeoXConfig

from mlkv.evaluation.model_info import kv_cache_info


def test_kv_bytes_per_token_matches_paper_table():
    pythia = GPTNeoXConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
    assert kv_cache_info(pythia)["bytes_per_token"] == 36_864
    from mlkv import preset_config

    for plan, expected in [("mha-144", 36_864), ("gqa-48", 12_288), ("mlkv-48", 12_288), ("mlkv-12", 3_072),
                           ("mlkv-6", 1_536), ("mlkv-1", 256)]:
        assert kv_cache_info(preset_config("pythia-160m", plan=plan))["bytes_per_token"] == expected, plan
