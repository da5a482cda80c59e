"""The ``mlkv`` command as a user runs it: help for every command and flag, one-line errors, and plan, convert and
generate end to end."""

import argparse
import json

import pytest
from transformers import PreTrainedTokenizerFast

from mlkv.cli import COMMANDS, build_parser, main
from mlkv.data import default_data_dir
from tiny import hf_neox

TOKENIZER = default_data_dir() / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def command_parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_flag_of_every_command_has_help_text(name):
    parser = command_parser(name)
    missing = [a.option_strings or [a.dest] for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, f"mlkv {name}: flags without help: {missing}"
    assert "examples:" in parser.format_help()


def test_mlkv_help_lists_every_command_with_an_example(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for name, (_, purpose, examples) in COMMANDS.items():
        assert purpose in out and examples[0] in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("mlkv 0.")


@pytest.mark.parametrize("argv, message", [
    (["plan", "--head-dim", "0"], "--head-dim (0) must be a positive integer"),
    (["plan", "--layers", "24", "--heads", "8", "--plans", "mlkv-48"], "use the explicit form"),
    (["convert", "no/such/model", "out", "--plan", "6x1"], "no/such/model"),
    (["generate", "no/such/model", "--prompt", "hi"], "no/such/model"),
    (["train", "--model", "pythia-160m", "--out", "x", "--tokens", "1M", "--data", "d", "--lr", "nan"],
     "--lr must be a finite number"),
])
def test_bad_input_is_one_line_naming_the_flag_or_file_with_exit_code_2(argv, message, capsys, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mlkv {argv[0]}: error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_generate_without_a_prompt_is_a_usage_error(tmp_path, capsys):
    hf_neox().save_pretrained(tmp_path / "m")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.startswith("mlkv generate: error: ")


def test_a_truncated_weights_file_is_named_not_a_traceback(tmp_path, capsys):
    src = tmp_path / "pythia"
    hf_neox().save_pretrained(src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "out"), "--plan", "3x1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlkv convert: error: ") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="not found: SRC_DIR must be a Hugging Face checkpoint directory"):
        main(["--debug", "convert", str(tmp_path / "nothing"), str(tmp_path / "out"), "--plan", "6x1"])


def test_plan_prints_the_paper_grid(capsys):
    assert main(["plan", "--layers", "12", "--heads", "12", "--head-dim", "64"]) == 0
    out = capsys.readouterr().out
    assert "MHA-144      12x12" in out and " MLKV-1        1x1" in out
    rows = {r["plan"]: r for r in last_json(out)["plans"]}
    assert rows["MHA-144"]["bytes_per_token"] == 36864 and rows["MLKV-1"]["bytes_per_token"] == 256
    assert rows["MLKV-6"]["vs_mha"] == "24.0x" and rows["MLKV-6"]["vs_mqa"] == "2.00x"


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="shared tokenizer not found")
def test_convert_then_generate_prints_a_continuation(tmp_path, capsys):
    src = tmp_path / "pythia"
    hf_neox(vocab_size=50304).save_pretrained(src)
    PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), eos_token="<|endoftext|>").save_pretrained(src)
    assert main(["convert", str(src), str(tmp_path / "mlkv"), "--plan", "3x1", "--init", "pairwise"]) == 0
    meta = last_json(capsys.readouterr().out)
    assert meta["structure"] == "3x1" and meta["init"] == "pairwise"
    for engine in ("hf", "fast"):
        assert main(["generate", str(tmp_path / "mlkv"), "--prompt", "The old house", "--max-new-tokens", "5",
                     "--engine", engine]) == 0
        out = capsys.readouterr().out
        result = last_json(out)["results"][0]
        assert out.startswith("The old house") and result["new_tokens"] == 5 and result["completion"]


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="shared tokenizer not found")
def test_convert_with_the_lsq_init_reads_calibration_text(tmp_path, capsys):
    src = tmp_path / "pythia"
    hf_neox(vocab_size=50304).save_pretrained(src)
    PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), eos_token="<|endoftext|>").save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 200)
    assert main(["convert", str(src), str(tmp_path / "out"), "--plan", "1x1", "--init", "lsq",
                 "--calibration-data", str(text), "--calibration-tokens", "1024"]) == 0
    assert last_json(capsys.readouterr().out)["init"] == "lsq"
