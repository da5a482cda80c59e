"""``mlkv plan`` and ``mlkv convert`` as their command module defines them: flags with help, clean usage errors."""

import argparse
import json

import pytest

from mlkv.errors import UsageError
from mlkv.model.commands import add_convert_arguments, add_plan_arguments, run_plan_command


def parser(add) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add(p)
    return p


@pytest.mark.parametrize("add", [add_plan_arguments, add_convert_arguments])
def test_every_flag_has_help(add):
    for action in parser(add)._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help, action.dest


@pytest.mark.parametrize("flag,value", [("--head-dim", "0"), ("--layers", "0"), ("--heads", "-2"),
                                        ("--context", "0")])
def test_plan_rejects_non_positive_shapes_naming_the_flag(flag, value):
    args = parser(add_plan_arguments).parse_args([flag, value])
    with pytest.raises(UsageError, match=f"{flag} \\({value}\\) must be a positive integer"):
        run_plan_command(args)


def test_plan_prints_a_table_and_json(capsys):
    assert run_plan_command(parser(add_plan_arguments).parse_args(["--layers", "4", "--heads", "4"])) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "KV cache for 4 layers x 4 heads, head_dim 64, fp16"
    assert out[1].split() == ["plan", "structure", "producers", "kv_heads", "bytes_per_token", "MiB_per_seq@2048",
                              "vs_mha", "vs_mqa", "kv_source_layers"]
    assert [r["plan"] for r in json.loads(out[-1])["plans"]] == ["MHA", "MQA"]


def test_plan_for_the_smollm2_shape_prints_the_gqa_grid(capsys):
    from mlkv.cli import main

    assert main(["plan", "--shape", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("KV cache for 30 layers x 9 heads (3 K/V heads), head_dim 64, fp16")
    rows = {r["plan"]: r for r in json.loads(out.strip().splitlines()[-1])["plans"]}
    assert list(rows) == ["30x3", "10x3", "30x1", "5x3", "15x1", "6x1", "3x1", "2x1", "1x1"]
    assert rows["30x3"]["bytes_per_token"] == 23040 and rows["10x3"]["vs_source"] == "3.0x"


def test_plan_kv_heads_must_divide_heads(capsys):
    from mlkv.cli import main

    assert main(["plan", "--heads", "9", "--kv-heads", "2"]) == 2
    assert "--kv-heads (2) must divide --heads (9)" in capsys.readouterr().err
