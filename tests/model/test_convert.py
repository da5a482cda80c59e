"""Conversion from transformers checkpoints: exact MHA equivalence with the peer models, init math, errors."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from mlkv import MLKVForCausalLM
from mlkv.model.convert import (ConversionError, build_model, convert_checkpoint, convert_state, fold_layers,
                                parameter_count)
from mlkv.model.flavors import NATIVE_ARCHITECTURE, SUPPORTED_ARCHITECTURES
from tiny import VOCAB, hf_llama, hf_neox, hf_qwen2, perturb

ATOL = 1e-5


def saved(model, path):
    model.save_pretrained(path)
    return path


def hf_mistral(seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                            max_position_embeddings=128, sliding_window=None)).eval()


#: A tiny transformers model of every architecture ``mlkv convert`` accepts (Mistral without its sliding window):
#: adding a family (an entry in ``mlkv.model.flavors``) means adding its model here, and the parity test covers it.
HF_MODELS = {"GPTNeoXForCausalLM": hf_neox, "LlamaForCausalLM": hf_llama, "Qwen2ForCausalLM": hf_qwen2,
             "MistralForCausalLM": hf_mistral}
HF_IDS = {"GPTNeoXForCausalLM": "gpt_neox", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
          "MistralForCausalLM": "mistral"}


def test_every_supported_architecture_has_a_parity_test():
    assert set(HF_MODELS) == set(SUPPORTED_ARCHITECTURES) - {NATIVE_ARCHITECTURE}


@pytest.mark.parametrize("make", list(HF_MODELS.values()), ids=list(HF_IDS.values()))
@torch.no_grad()
def test_mha_conversion_reproduces_transformers_logits(make, tmp_path):
    hf = perturb(make())
    state, config = convert_state(saved(hf, tmp_path), "mha")
    ours = build_model(state, config).eval()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    assert (ours(ids).logits - hf(ids).logits).abs().max() <= ATOL


@torch.no_grad()
def test_llama3_rope_scaling_and_untied_head(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 500000.0}
    hf = perturb(hf_llama(rope_scaling=rope, attention_bias=True))
    state, config = convert_state(saved(hf, tmp_path), "mha")
    assert config.rope_parameters["rope_type"] == "llama3"
    ids = torch.randint(0, VOCAB, (1, 100))
    assert (build_model(state, config).eval()(ids).logits - hf(ids).logits).abs().max() <= ATOL


@torch.no_grad()
def test_pythia_160m_shape_reproduces_transformers_logits(tmp_path):
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, hidden_size=768, num_hidden_layers=12,
                                          num_attention_heads=12, intermediate_size=3072, rotary_pct=0.25,
                                          max_position_embeddings=2048)).eval()
    state, config = convert_state(saved(hf, tmp_path), "mha")
    ours = build_model(state, config).eval()
    assert parameter_count(config) == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 50304, (1, 64))
    assert (ours(ids).logits - hf(ids).logits).abs().max() <= ATOL


def _k_weight(state, layer):
    return state[f"model.layers.{layer}.self_attn.k_proj.weight"]


def test_mean_init_is_the_uniform_mean_of_heads_and_layers(tmp_path):
    hf = hf_neox(num_hidden_layers=4)
    src, _ = convert_state(saved(hf, tmp_path), "mha")
    state, config = convert_state(tmp_path, [0, 0, 0, 3], init="mean")  # explicit list keeps 4 heads
    expected = torch.stack([_k_weight(src, i) for i in (0, 1, 2)]).mean(0)
    assert torch.allclose(_k_weight(state, 0), expected, atol=1e-7)
    assert torch.equal(_k_weight(state, 3), _k_weight(src, 3))
    # In-layer pooling: 4 heads -> 1 head is the mean of the 4 heads (head_dim 8).
    state1, _ = convert_state(tmp_path, "4x1", init="mean")
    heads = _k_weight(src, 0).reshape(4, 8, -1)
    assert torch.allclose(_k_weight(state1, 0), heads.mean(0), atol=1e-7)
    assert "model.layers.1.self_attn.k_proj.weight" not in state


def test_pairwise_reproduces_the_reference_running_average():
    w = [torch.full((2, 2), v) for v in (4.0, 8.0, 16.0)]
    # Reference code: W_p = mean([W_1, W_p]) then mean([W_2, W_p]): 4/4 + 8/4 + 16/2 = 11
    assert torch.equal(fold_layers(w, "pairwise"), torch.full((2, 2), 11.0))
    assert torch.equal(fold_layers(w, "mean"), torch.full((2, 2), 28.0 / 3))
    assert torch.equal(fold_layers(w, "first"), w[0])


def test_first_init_copies_the_producers_pooled_kv(tmp_path):
    hf = hf_neox(num_hidden_layers=4)
    src, _ = convert_state(saved(hf, tmp_path), "mha")
    state, _ = convert_state(tmp_path, "2x4", init="first")
    assert torch.equal(_k_weight(state, 2), _k_weight(src, 2))


@pytest.mark.parametrize("make", [hf_neox, hf_llama], ids=["gpt_neox", "llama"])
@torch.no_grad()
def test_keep_params_restores_count_and_leaves_function_unchanged(make, tmp_path):
    hf = perturb(make())
    saved(hf, tmp_path)
    state, config = convert_state(tmp_path, "1x1")
    wide_state, wide = convert_state(tmp_path, "1x1", keep_params=True)
    assert wide.intermediate_size > config.intermediate_size
    per_neuron = (3 if wide.flavor == "llama" else 2) * wide.hidden_size + 2
    assert abs(parameter_count(wide) - sum(p.numel() for p in hf.parameters())) <= per_neuron * wide.num_hidden_layers
    ids = torch.randint(0, VOCAB, (2, 16))
    a = build_model(state, config).eval()(ids).logits
    b = build_model(wide_state, wide).eval()(ids).logits
    assert torch.allclose(a, b, atol=ATOL)


def test_paper_widths_match_the_reference_code():
    from mlkv.model.config import preset_config
    from mlkv.model.convert import widened_intermediate
    from mlkv.model.sharing import resolve_plan

    base = preset_config("pythia-160m")
    assert widened_intermediate(base, resolve_plan("GQA-48", 12, 12)) == 3584  # paper: about 3584
    assert abs(widened_intermediate(base, resolve_plan("MLKV-1", 12, 12)) - 3835) <= 1  # paper: about 3835


@torch.no_grad()
def test_checkpoint_round_trip_is_exact_and_copies_tokenizer(tmp_path):
    hf = perturb(hf_llama())
    src = saved(hf, tmp_path / "src")
    (src / "tokenizer.json").write_text("{}")
    dst = convert_checkpoint(src, tmp_path / "dst", plan="2x1")  # the default init is pairwise (measured best)
    assert (dst / "tokenizer.json").is_file() and (dst / "model.safetensors").is_file()
    meta = json.loads((dst / "mlkv_conversion.json").read_text())
    assert meta["structure"] == "2x1" and meta["init"] == "pairwise"
    loaded = AutoModelForCausalLM.from_pretrained(dst)
    assert isinstance(loaded, MLKVForCausalLM)
    state, _ = convert_state(src, "2x1", init="pairwise")
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite to replace it"):
        convert_checkpoint(src, dst, plan="2x1")


def test_the_record_names_the_source_kv_bytes_and_the_base_license_and_a_conversion_of_it_inherits_them(tmp_path):
    src = saved(hf_llama(), tmp_path / "src")  # 3 layers x 2 K/V heads x head_dim 8
    (src / "README.md").write_text("---\nlanguage: en\nlicense: mit\n---\n# a model\n")
    meta = json.loads((convert_checkpoint(src, tmp_path / "mha", plan="mha") / "mlkv_conversion.json").read_text())
    assert meta["source_structure"] == "3x2" and meta["source_kv_bytes_per_token_fp16"] == 2 * 3 * 2 * 8 * 2
    assert meta["base"] == {"source": str(src), "license": "mit"}
    again = json.loads((convert_checkpoint(tmp_path / "mha", tmp_path / "1x1", plan="1x1")
                        / "mlkv_conversion.json").read_text())
    assert again["base"] == meta["base"] and again["source"] == str(tmp_path / "mha")


def test_overwrite_replaces_the_folder_with_normal_permissions_and_companion_files(tmp_path):
    src = saved(hf_llama(), tmp_path / "src")
    for name in ("tokenizer.json", "chat_template.jinja", "vocab.txt"):
        (src / name).write_text("x")
    dst = convert_checkpoint(src, tmp_path / "dst", plan="2x1")
    (dst / "stale.txt").write_text("from the old folder")
    convert_checkpoint(src, dst, plan="1x1", overwrite=True)
    assert json.loads((dst / "mlkv_conversion.json").read_text())["structure"] == "1x1"
    assert not (dst / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no temporary or set-aside folder left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    for name in ("tokenizer.json", "chat_template.jinja", "vocab.txt", "generation_config.json"):
        assert (dst / name).is_file(), name


def test_pytorch_bin_is_loaded_with_weights_only(tmp_path):
    hf = hf_neox()
    saved(hf, tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "pytorch_model.bin")
    state, config = convert_state(tmp_path, "mha")
    ids = torch.randint(0, VOCAB, (1, 12))
    assert (build_model(state, config).eval()(ids).logits - hf(ids).logits).abs().max() <= ATOL


def test_unsupported_architecture_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ConversionError, match=r"architectures \(\['BertForMaskedLM'\]\) is not supported; supported: "
                                              r"GPTNeoXForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM"):
        convert_state(tmp_path, "mha")


def test_mistral_with_sliding_window_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}))
    with pytest.raises(ConversionError, match=r"sliding_window \(4096\) must be null"):
        convert_state(tmp_path, "mha")


def test_unknown_missing_and_misshaped_keys_are_listed(tmp_path):
    saved(hf_neox(), tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["gpt_neox.layers.0.extra.weight"] = torch.zeros(2)
    del weights["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    weights["gpt_neox.final_layer_norm.weight"] = torch.zeros(5)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        convert_state(tmp_path, "mha")
    msg = str(err.value)
    assert "unknown (1): gpt_neox.layers.0.extra.weight" in msg
    assert "missing (1): model.layers.1.mlp.down_proj.bias" in msg
    assert "mis-shaped (1): model.norm.weight: (5,) (expected (32,))" in msg


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    saved(hf_neox(), tmp_path / "src")
    with pytest.raises(ValueError, match="ambiguous or impossible"):
        convert_checkpoint(tmp_path / "src", tmp_path / "out", plan="mlkv-99")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_init_and_kv_heads_errors(tmp_path):
    saved(hf_llama(), tmp_path)  # 2 KV heads in the source
    with pytest.raises(ConversionError, match=r"init \('best'\) must be one of"):
        convert_state(tmp_path, "mha", init="best")
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by num_key_value_heads \(3\)"):
        convert_state(tmp_path, "3x3")


@torch.no_grad()
def test_an_mha_mlkv_checkpoint_converts_to_a_plan(tmp_path):
    from tiny import tiny_model

    model = tiny_model("gpt_neox")  # every layer a producer
    model.save_pretrained(tmp_path / "mha")
    state, config = convert_state(tmp_path / "mha", "2x1")
    assert config.kv_source_layers == [0, 0, 2, 2]
    mha_state, mha_config = convert_state(tmp_path / "mha", "mha")
    ids = torch.randint(0, VOCAB, (1, 10))
    assert torch.allclose(build_model(mha_state, mha_config).eval()(ids).logits, model(ids).logits, atol=ATOL)
    build_model(state, config).save_pretrained(tmp_path / "shared")
    with pytest.raises(ConversionError, match=r"already shares K/V across layers"):
        convert_state(tmp_path / "shared", "1x1")


def test_a_killed_conversions_temporary_folder_is_removed_and_reported_by_the_next(tmp_path, capsys):
    src = saved(hf_llama(), tmp_path / "src")
    stale = tmp_path / ".dst.tmp-99999-deadbeef"  # what a conversion killed mid-write leaves
    (stale / ".gguf-x").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    convert_checkpoint(src, tmp_path / "dst", plan="2x1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
    assert f"mlkv: removed {stale}, left by an interrupted earlier run" in capsys.readouterr().err


def test_a_truncated_or_malformed_source_is_a_conversion_error_naming_the_file(tmp_path):
    src = saved(hf_llama(), tmp_path / "src")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConversionError, match=r"src/model.safetensors: cannot be read \(Error while deserializing "
                                              r"header: incomplete metadata, file not fully covered\); the file is "
                                              r"missing, truncated or corrupt: download or copy the checkpoint again"):
        convert_checkpoint(src, tmp_path / "dst", plan="2x1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    (src / "config.json").write_text('["not", "a", "config"]')
    with pytest.raises(ConversionError, match=r"src/config.json: not a model config \(a JSON list, not an object\)"):
        convert_state(src, "mha")
    (src / "config.json").write_text('{"architectures": ')
    with pytest.raises(ConversionError, match=r"src/config.json: cannot be read \(Expecting value: line 1"):
        convert_state(src, "mha")
