"""``mlkv generate`` (mlkv.inference.generate): flags, the missing-prompt error, and both engines on a tiny
checkpoint with a word-level tokenizer."""

import argparse
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mlkv.errors import UsageError
from mlkv.inference.generate import add_generate_arguments, hf_generate, run_generate_command
from tiny import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = VOCAB - 1


def parse(argv):
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    return parser, parser.parse_args(argv)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """``w0`` .. ``w95``, one id per word; ``w95`` is the eos token."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"w{EOS}", pad_token=f"w{EOS}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model = tiny_model("llama", "2x2")
    model.config.eos_token_id = EOS
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_every_flag_has_help():
    parser, args = parse(["ckpt"])
    assert all(a.help for a in parser._actions)
    assert (args.engine, args.max_new_tokens, args.temperature, args.prompt) == ("hf", 64, 0.0, None)


def test_no_prompt_is_a_usage_error(tmp_path):
    _, args = parse([str(tmp_path)])
    with pytest.raises(UsageError, match=r"give at least one --prompt or a --prompts-file"):
        run_generate_command(args)
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    _, args = parse([str(tmp_path), "--prompts-file", str(empty)])
    with pytest.raises(UsageError, match="--prompts-file"):
        run_generate_command(args)


def test_both_engines_continue_the_prompts_alike(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w9 w2\n\nw7\n")
    results = {}
    for engine in ("hf", "fast"):
        _, args = parse([str(checkpoint), "--prompt", "w3 w4", "--prompts-file", str(prompts), "--max-new-tokens",
                         "6", "--engine", engine, "--device", "cpu"])
        assert run_generate_command(args) == 0
        out = capsys.readouterr().out
        last = json.loads(out.strip().splitlines()[-1])
        assert last["engine"] == engine and out.startswith("w3 w4")
        results[engine] = last["results"]
    assert [r["prompt"] for r in results["hf"]] == ["w3 w4", "w5 w9 w2", "w7"]
    assert all(1 <= r["new_tokens"] <= 6 for r in results["hf"])
    assert results["fast"] == results["hf"]  # greedy, fp32: the engine continues as transformers does


def test_hf_generate_left_pads_and_cuts_after_eos():
    model = tiny_model("gpt_neox", "mqa")
    tok = word_tokenizer()
    ids = [[3, 4, 5], [6]]
    free = hf_generate(model, tok, ids, 5)
    assert [len(t) for t in free] == [5, 5]
    single = hf_generate(model, tok, [[6]], 5)
    assert single == free[1:]  # a left-padded row continues as it does alone
    stop = free[0][2]
    tok.eos_token = f"w{stop}"
    cut = hf_generate(model, tok, ids, 5)[0]
    assert cut == free[0][:free[0].index(stop) + 1]
