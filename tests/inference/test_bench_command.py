"""``mlkv bench``'s flags (built from BenchSettings) and a whole run through them on CPU (simulated allocator)."""

import argparse
import json

import pytest

from mlkv.inference.bench.command import add_bench_arguments, run_bench_command

pytestmark = pytest.mark.usefixtures("one_thread")

#: The flags ``mlkv bench`` had before its settings became a dataclass: every one must still parse.
FLAGS = ["--plans", "--budget-gb", "--context", "--batch", "--prompt-len", "--new-tokens", "--step-context",
         "--step-batch", "--step-tokens", "--context-batch", "--device", "--dtype", "--repeats", "--hf-repeats",
         "--hf-max-batch", "--no-hf", "--hf-compile", "--compile", "--compile-plans", "--compile-max-batch",
         "--no-search", "--bucket", "--deadline-s", "--quick", "--seed", "--out", "--no-progress"]


def test_every_flag_is_kept_and_has_help():
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    flags = {f for a in actions for f in a.option_strings}
    assert set(FLAGS) <= flags
    assert all(a.help for a in actions) and all(a.help for a in parser._actions if a.dest == "model")
    args = parser.parse_args([])
    assert (args.model, args.batch, args.hf, args.search, args.progress, args.bucket) == (
        "pythia-160m", None, True, True, True, "auto")


@pytest.mark.slow
def test_run_bench_simulated_allocator_and_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["tiny-llama", "--plans", "mha", "mqa", "--batch", "2", "--prompt-len", "4",
                              "--new-tokens", "3", "--step-context", "16", "--step-batch", "1,2", "--step-tokens",
                              "3", "--context", "32", "--context-batch", "2", "--no-hf", "--device", "cpu",
                              "--repeats", "1", "--budget-gb", "0.01", "--out", str(tmp_path), "--no-progress",
                              "--bucket", "4"])
    assert run_bench_command(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["errors"] == []
    assert last["bench"]["MQA"]["max_batch"] > last["bench"]["MHA"]["max_batch"] > 0
    data = json.loads((tmp_path / "inference.json").read_text())
    assert data["meta"]["fit_method"].startswith("simulated")
    assert data["meta"]["settings"]["bucket"] == 4


def test_bad_bucket_names_the_flag():
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    with pytest.raises(ValueError, match=r"--bucket \('x'\) must be a positive integer, 'none' or 'auto'"):
        run_bench_command(parser.parse_args(["--bucket", "x"]))
