"""Flags built from settings dataclasses (mlkv.settings) and the shared table formatter (mlkv.tables)."""

import argparse
from dataclasses import dataclass

import pytest

from mlkv.settings import add_arguments, from_args, setting
from mlkv.tables import fmt, markdown_table, text_table


@dataclass
class Example:
    out: str
    """Where results go."""
    seq_len: int = setting(2048, group="shape")
    """Tokens per sequence."""
    lr: float | None = None
    """Peak learning rate."""
    data: list[str] = setting(default_factory=list, aliases=("--inputs",))
    """Input files."""
    compile: bool = False
    """Compile the model."""
    progress: bool = True
    """Show a progress bar."""
    objective: str = setting("lm", choices=("lm", "distill"))
    """Training objective."""
    hidden: int = setting(0, cli=False)


def parse(argv):
    return add_arguments(argparse.ArgumentParser(prog="x"), Example).parse_args(argv)


def test_flags_take_their_types_defaults_and_help_from_the_dataclass():
    args = parse(["--out", "o", "--seq-len", "128", "--inputs", "a", "b", "--compile", "--no-progress"])
    cfg = from_args(Example, args)
    assert cfg == Example(out="o", seq_len=128, data=["a", "b"], compile=True, progress=False)
    help_text = add_arguments(argparse.ArgumentParser(prog="x"), Example).format_help()
    assert "Tokens per sequence. (default: 2048)" in help_text and "shape:" in help_text
    assert "--hidden" not in help_text


def test_a_bad_choice_or_a_missing_required_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse(["--out", "o", "--objective", "kd"])
    assert "invalid choice: 'kd'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse([])
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_tables_align_text_and_format_numbers():
    rows = [{"plan": "MHA-144", "bytes": 36864}, {"plan": "MLKV-1", "bytes": 256}]
    assert text_table(rows).splitlines() == ["   plan  bytes", "MHA-144  36864", " MLKV-1    256"]
    assert markdown_table([["a", fmt(1234)]], ["k", "v"]).splitlines()[-1] == "| a | 1,234 |"
    assert fmt(None) == "-" and fmt(0.5, ".1f", pct=True) == "50.0" and fmt(3.14159, ".3g") == "3.14"
