"""Architecture families (mlkv.model.flavors): the config, the model and the converter read their entries."""

import pytest
import torch
from torch import nn

from mlkv.model.config import MLKVConfig
from mlkv.model.flavors import FLAVORS, NATIVE_ARCHITECTURE, SUPPORTED_ARCHITECTURES, for_architecture
from mlkv.model.modeling import MLKVRMSNorm
from tiny import tiny_model


@pytest.mark.parametrize("name", list(FLAVORS))
def test_config_defaults_and_blocks_come_from_the_entry(name):
    flavor = FLAVORS[name]
    config = MLKVConfig(flavor=name, hidden_size=32, num_attention_heads=4, num_hidden_layers=2)
    for field, value in flavor.config_defaults().items():
        assert getattr(config, field) == value, field
    assert config.attention_out_bias == config.attention_bias
    assert config.rope_parameters["partial_rotary_factor"] == flavor.partial_rotary_factor
    layer = tiny_model(name).model.layers[0]
    assert isinstance(layer.input_layernorm, nn.LayerNorm if flavor.norm == "layernorm" else MLKVRMSNorm)
    assert hasattr(layer.mlp, "gate_proj") == flavor.gated_mlp
    assert layer.parallel == flavor.parallel_residual


def test_unknown_flavor_names_the_known_ones():
    with pytest.raises(ValueError, match=r"flavor \('bert'\) must be one of \('gpt_neox', 'llama'\)"):
        MLKVConfig(flavor="bert")


def test_every_architecture_belongs_to_one_entry():
    hf = [a for a in SUPPORTED_ARCHITECTURES if a != NATIVE_ARCHITECTURE]
    assert len(hf) == len(set(hf)) and SUPPORTED_ARCHITECTURES[-1] == NATIVE_ARCHITECTURE
    assert for_architecture("Qwen2ForCausalLM")[0] is FLAVORS["llama"]
    with pytest.raises(KeyError):
        for_architecture("BertForMaskedLM")


def test_neox_fused_qkv_split_is_per_head():
    fused = torch.arange(2 * 3 * 4).reshape(2 * 3 * 4, 1)  # rows [heads=2, qkv=3, head_dim=4]
    q, k, v = FLAVORS["gpt_neox"].fused_qkv.split(fused, 2, 4)
    assert q.flatten().tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert k.flatten().tolist() == [4, 5, 6, 7, 16, 17, 18, 19]
    assert v.flatten().tolist() == [8, 9, 10, 11, 20, 21, 22, 23]
