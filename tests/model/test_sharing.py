import pytest
import torch

from mlkv.model.sharing import PAPER_PRESETS, SharingPlan, paper_grid, producer_layers, resolve_plan

PAPER_TABLE = {  # name: (structure, sources, fp16 bytes/token) from the paper's table on Pythia-160M
    "MHA-144": ("12x12", 36864), "GQA-48": ("12x4", 12288), "MLKV-48": ("4x12", 12288), "MQA-12": ("12x1", 3072),
    "MLKV-12": ("4x3", 3072), "MLKV-6": ("6x1", 1536), "MLKV-4": ("4x1", 1024), "MLKV-2": ("2x1", 512),
    "MLKV-1": ("1x1", 256),
}


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_names_resolve_as_the_paper(name):
    plan = resolve_plan(name, 12, 12)
    structure, nbytes = PAPER_TABLE[name]
    assert plan.structure == structure
    assert plan.kv_bytes_per_token(64, torch.float16) == nbytes
    assert resolve_plan(structure, 12, 12).kv_source_layers == plan.kv_source_layers


def test_producer_positions_and_nearest_source():
    assert producer_layers(12, 4) == [0, 3, 6, 9]
    assert producer_layers(12, 6) == [0, 2, 4, 6, 8, 10]
    assert resolve_plan("4x1", 12, 12).kv_source_layers == (0, 0, 0, 3, 3, 3, 6, 6, 6, 9, 9, 9)
    assert resolve_plan("5x1", 12, 12).producers == [0, 2, 4, 7, 9]
    assert resolve_plan("cla-3", 8, 4).kv_source_layers == (0, 0, 0, 3, 3, 3, 6, 6)


def test_general_names_on_other_shapes():
    assert resolve_plan("mha", 4, 8).structure == "4x8"
    assert resolve_plan("mqa", 4, 8).structure == "4x1"
    assert resolve_plan("gqa-8", 4, 8).structure == "4x2"
    assert resolve_plan("mlkv-2", 4, 8).structure == "2x1"
    assert resolve_plan("0,0,2,2:4", 4, 8).kv_source_layers == (0, 0, 2, 2)
    assert resolve_plan([0, 1, 1, 1], 4, 8).producers == [0, 1]


def test_ambiguous_name_suggests_explicit_form():
    with pytest.raises(ValueError, match=r"ambiguous.*24 layers x 8 heads.*6x8, 12x4, 24x2"):
        resolve_plan("mlkv-48", 24, 8)
    with pytest.raises(ValueError, match="not understood"):
        resolve_plan("banana", 12, 12)


def test_cache_math():
    plan = resolve_plan("MLKV-6", 12, 12)
    assert plan.kv_bytes_per_token(64, "fp32") == 3072
    assert plan.kv_bytes_per_sequence(64, 2048, "bf16") == 1536 * 2048
    assert plan.kv_sharing_modes() == [None, "reuse"] * 6
    assert [p.total_kv_heads for p in paper_grid()] == [144, 48, 48, 12, 12, 6, 4, 2, 1]


@pytest.mark.parametrize("sources,kv,heads,match", [
    ([0, 0], 5, 12, r"num_attention_heads \(12\) must be divisible by num_key_value_heads \(5\)"),
    ([], 1, 4, "at least one producer"),
    ([1, 1], 1, 4, r"kv_source_layers\[0\] \(1\) must be 0: layer 0 must be a producer"),
    ([0, 2, 2], 1, 4, r"kv_source_layers\[1\] \(2\) comes after its consumer"),
    ([0, 0, 1], 1, 4, r"kv_source_layers\[2\] \(1\) is itself a consumer.*must itself be a producer"),
])
def test_invalid_plans_are_rejected(sources, kv, heads, match):
    with pytest.raises(ValueError, match=match):
        SharingPlan(tuple(sources), kv, heads)


def test_list_length_must_match_layers():
    with pytest.raises(ValueError, match=r"kv_source_layers has 2 entries but num_hidden_layers is 3"):
        resolve_plan([0, 0], 3, 4)
    with pytest.raises(ValueError, match=r"number of producer layers \(13\) must be between 1 and"):
        resolve_plan("13x1", 12, 12)


def test_zero_and_bare_number_names_get_clear_errors():
    with pytest.raises(ValueError, match=r"number of KV heads \(0\) must be at least 1"):
        resolve_plan("gqa-0", 12, 12)
    with pytest.raises(ValueError, match=r"did you mean 6x1 or mlkv-6"):
        resolve_plan("6", 12, 12)


def test_a_gqa_source_keeps_its_kv_heads_for_every_head_names():
    from mlkv.model.sharing import resolve_plan

    assert resolve_plan("mha", 30, 9, kv_heads=3).structure == "30x3"
    assert resolve_plan("cla-2", 30, 9, kv_heads=3).structure == "15x3"
    assert resolve_plan("0,0,2,2", 4, 9, kv_heads=3).num_key_value_heads == 3
    assert resolve_plan("mha", 30, 9).structure == "30x9"  # no source given: every query head


def test_more_kv_heads_than_the_source_is_refused_with_a_hint():
    from mlkv.model.sharing import resolve_plan

    with pytest.raises(ValueError, match=r"more than the source model's 3: .* use at most 3 \(e.g. 10x3\)"):
        resolve_plan("10x9", 30, 9, kv_heads=3)


def test_default_grid_for_a_gqa_shape_pairs_cross_layer_and_in_layer_sharing():
    from mlkv.model.sharing import default_grid

    assert default_grid(30, 9, 3) == ["30x3", "10x3", "30x1", "5x3", "15x1", "6x1", "3x1", "2x1", "1x1"]
    assert default_grid(12, 12) == PAPER_PRESETS and default_grid(24, 8) == ["mha", "mqa"]
