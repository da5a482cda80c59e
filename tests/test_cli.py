"""``mlkv plan``, ``mlkv convert`` and ``mlkv generate`` as a user runs them."""

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from mlkv.cli import main
from tiny import hf_neox

TOKENIZER = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tokenizers" / "gpt-neox-20b" / \
    "tokenizer.json"


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_plan_prints_the_paper_grid(capsys):
    assert main(["plan", "--layers", "12", "--heads", "12", "--head-dim", "64"]) == 0
    out = capsys.readouterr().out
    assert "MHA-144      12x12" in out and " MLKV-1        1x1" in out
    rows = {r["plan"]: r for r in last_json(out)["plans"]}
    assert rows["MHA-144"]["bytes_per_token"] == 36864 and rows["MLKV-1"]["bytes_per_token"] == 256
    assert rows["MLKV-6"]["vs_mha"] == "24.0x" and rows["MLKV-6"]["vs_mqa"] == "2.00x"


def test_plan_error_names_the_rule(capsys):
    assert main(["plan", "--layers", "24", "--heads", "8", "--plans", "mlkv-48"]) == 2
    assert "use the explicit form" in capsys.readouterr().err


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
