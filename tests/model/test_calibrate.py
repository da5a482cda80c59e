"""The data-aware conversion init (``--init lsq``): a least-squares fit of each shared K/V projection."""

import pytest
import torch

from mlkv.model.calibrate import attention_inputs, fit_shared_projection
from mlkv.model.convert import ConversionError, build_model, convert_state
from tiny import VOCAB, hf_llama, hf_qwen2


@pytest.fixture()
def llama_dir(tmp_path):
    hf_llama(num_hidden_layers=4).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def calib(n=8, t=32, seed=0):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))  # (S, T)


def kv_error(state, plan_state, plan, inputs, proj="k_proj"):
    """Mean squared difference between each served layer's original K (pooled heads) and its producer's new K."""
    from mlkv.model.convert import pool_heads

    err = 0.0
    for p in plan.producers:
        new = inputs[p] @ plan_state[f"model.layers.{p}.self_attn.{proj}.weight"].T  # (N, H_kv*D)
        for i in plan.served_by(p):
            w = pool_heads(state[f"model.layers.{i}.self_attn.{proj}.weight"], 2, plan.num_key_value_heads, 8)
            err += (inputs[i] @ w.T - new).pow(2).mean().item()
    return err


def test_lsq_recovers_the_original_weights_when_nothing_is_shared(llama_dir):
    tokens = calib()
    state, config = convert_state(llama_dir, "4x2", init="first")
    fitted, _ = convert_state(llama_dir, "4x2", init="lsq", calibration=tokens)
    for key in state:
        if ".k_proj." in key or ".v_proj." in key:
            torch.testing.assert_close(fitted[key], state[key], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("plan_name", ["2x2", "4x1", "1x1"])
def test_lsq_fits_the_served_layers_better_than_the_weight_only_inits(llama_dir, plan_name):
    tokens = calib()
    state, config = convert_state(llama_dir, "4x2", init="first")
    inputs = attention_inputs(build_model(state, config).eval(), tokens)
    plan = config.with_plan(plan_name).sharing
    errors = {init: kv_error(state, convert_state(llama_dir, plan_name, init=init, calibration=inputs)[0], plan,
                             inputs) for init in ("mean", "pairwise", "first", "lsq")}
    assert errors["lsq"] <= min(errors.values()) + 1e-6, errors


def test_lsq_fits_biases_of_a_qwen2_source(tmp_path):
    hf_qwen2(num_hidden_layers=2).save_pretrained(tmp_path / "qwen2")
    state, _ = convert_state(tmp_path / "qwen2", "1x2", init="lsq", calibration=calib())
    assert state["model.layers.0.self_attn.k_proj.bias"].shape == (16,)
    build_model(state, convert_state(tmp_path / "qwen2", "1x2", init="first")[1])  # every key fits the model


def test_fit_shared_projection_is_the_mean_target_least_squares():
    x = torch.randn(200, 6, dtype=torch.float64)
    w1, w2 = torch.randn(4, 6), torch.randn(4, 6)
    weight, bias = fit_shared_projection([(w1, None, x.float()), (w2, None, x.float())], x.float())
    assert bias is None
    torch.testing.assert_close(weight, (w1 + w2) / 2, atol=1e-3, rtol=1e-3)


def test_lsq_without_calibration_names_the_flag(llama_dir):
    with pytest.raises(ConversionError, match="init 'lsq' needs calibration text"):
        convert_state(llama_dir, "2x2", init="lsq")
