"""The settings of a run (mlkv.training.config): token counts and the checks made before anything is loaded."""

from __future__ import annotations

import pytest

from mlkv.training import TrainConfig, parse_tokens
from mlkv.training.config import check_config


def test_parse_tokens():
    assert parse_tokens("20M") == 20_000_000
    assert parse_tokens("1.5B") == 1_500_000_000
    assert parse_tokens("300k") == 300_000
    assert parse_tokens("2e9") == 2_000_000_000
    assert parse_tokens("500_000") == 500_000
    assert parse_tokens(4096) == 4096
    for bad in ("20X", "abc", "", "1.5", "-5M", "0"):
        with pytest.raises(ValueError, match="bad token count"):
            parse_tokens(bad)


def check(**kw) -> None:
    check_config(TrainConfig(**{"model": "m", "out": "o", "steps": 1, **kw}), have_datasets=True)


@pytest.mark.parametrize("name", ["lr", "grad_clip", "weight_decay", "min_lr_ratio", "warmup_ratio", "beta1",
                                  "beta2", "adam_eps", "distill_temperature", "distill_hidden", "val_fraction"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_settings_are_refused(name, value):
    """NaN passes every range check (each comparison is false) and inf most: both are refused by name."""
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{flag} must be a finite number, got {value}$"):
        check(**{name: value})


def test_optimizer_settings_name_the_flag_and_value():
    check()  # the defaults pass
    for kw, message in [({"lr": 0.0}, "--lr must be positive, got 0.0"),
                        ({"weight_decay": -0.1}, "--weight-decay must be >= 0, got -0.1"),
                        ({"grad_clip": -1.0}, "--grad-clip must be >= 0, got -1.0"),
                        ({"adam_eps": -1e-8}, "--adam-eps must be >= 0, got -1e-08"),
                        ({"beta1": 1.0}, r"--beta1 must be in \[0, 1\), got 1.0"),
                        ({"beta2": -0.5}, r"--beta2 must be in \[0, 1\), got -0.5"),
                        ({"warmup_ratio": 1.0}, r"--warmup-ratio must be in \[0, 1\), got 1.0"),
                        ({"min_lr_ratio": 1.5}, r"--min-lr-ratio must be in \[0, 1\], got 1.5")]:
        with pytest.raises(ValueError, match=message):
            check(**kw)
