"""``mlkv eval`` (``mlkv.evaluation.command``): a whole evaluation from the flags, its errors, and its help without the
optional packages."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mlkv
from mlkv.data.paths import DataFileNotFoundError, default_data_dir
from mlkv.evaluation import results, tasks
from mlkv.evaluation.command import add_eval_arguments, run_eval_command
from mlkv.evaluation.perplexity import resolve_perplexity_path

DATA = default_data_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "eval").is_dir() or not (DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json").is_file()
    or importlib.util.find_spec("lm_eval") is None, reason=f"needs lm-eval and the shared data ({DATA}; MLKV_DATA)")


def _args(*argv):
    return add_eval_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv])


@needs_data
def test_eval_command(tiny_dir, tmp_path, capsys):
    output = tmp_path / "tiny_results.json"
    code = run_eval_command(_args(tiny_dir, "--tasks", "piqa,arc_easy", "--limit", 2, "--perplexity",
                                  "wikitext2", "--device", "cpu", "--data-dir", DATA, "--output", output,
                                  "--max-length", 128, "--compare", output))
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert set(summary["tasks"]) == {"piqa", "arc_easy"} and "acc" in summary["tasks"]["piqa"]
    ppl = summary["perplexity"]["wikitext2"]
    assert ppl["token_perplexity"] > 1 and ppl["word_perplexity"] > ppl["byte_perplexity"] > 1
    assert "| piqa | acc |" in out and "| wikitext2 (ppl) | word_perplexity |" in out
    assert "| config | KV bytes/token |" in out and len(summary["compare"]) == 2
    saved = results.load_results(output)
    assert saved["mlkv"]["perplexity"]["wikitext2"]["documents"] == 2
    assert saved["mlkv"]["perplexity"]["wikitext2"]["token_level"]["max_length"] == 128


@needs_data
def test_unknown_task_lists_supported(tiny_dir, capsys):
    with pytest.raises(tasks.UnknownTaskError, match=r"unknown task\(s\): mmlu.*Supported.*lambada_openai.*piqa"):
        tasks.check_tasks(["piqa", "mmlu"])
    assert tasks.check_tasks("piqa, sciq") == ["piqa", "sciq"]
    assert run_eval_command(_args(tiny_dir, "--tasks", "nope")) == 2
    assert "arc_easy" in capsys.readouterr().err


@needs_data
def test_missing_data_file_names_file_and_setting(tiny_dir, tmp_path, capsys):
    with pytest.raises(DataFileNotFoundError, match=r"piqa/valid\.jsonl.*--data-dir.*MLKV_DATA"):
        tasks.run_tasks(tiny_dir, ["piqa"], limit=2, device="cpu", data_dir=tmp_path)
    with pytest.raises(DataFileNotFoundError, match=r"wiki\.test\.raw.*MLKV_DATA"):
        resolve_perplexity_path("wikitext2", tmp_path)
    with pytest.raises(DataFileNotFoundError, match="perplexity file not found"):
        resolve_perplexity_path(tmp_path / "nope.txt")
    assert run_eval_command(_args(tiny_dir, "--tasks", "sciq", "--data-dir", tmp_path)) == 2
    assert "sciq_test.jsonl" in capsys.readouterr().err


def test_usage_errors(capsys, tmp_path):
    assert run_eval_command(_args()) == 2
    assert "give a checkpoint directory" in capsys.readouterr().err
    if importlib.util.find_spec("lm_eval") is not None:  # checked after the extra, before the model loads
        assert run_eval_command(_args(tmp_path, "--perplexity", "gutenberg", "--max-tokens", 1)) == 2
        assert "--max-tokens must be at least 2" in capsys.readouterr().err


def test_every_flag_has_help():
    parser = add_eval_arguments(argparse.ArgumentParser())
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]


def test_help_and_compare_work_without_lm_eval_and_datasets_and_evaluating_names_the_extra(tmp_path):
    """With only the base package (lm-eval and datasets made unimportable in a fresh interpreter), ``--help`` and
    ``--compare`` work, and evaluating a checkpoint says which extra to install (exit code 2)."""
    saved = tmp_path / "a.json"
    saved.write_text(json.dumps({"results": {"piqa": {"acc,none": 0.5}}, "mlkv": {"name": "a"}}))
    script = textwrap.dedent("""
        import argparse, sys
        sys.modules["lm_eval"] = sys.modules["datasets"] = None  # not installed: imports fail, find_spec is None
        from mlkv.evaluation.command import add_eval_arguments, run_eval_command
        parser = add_eval_arguments(argparse.ArgumentParser(prog="mlkv eval"))
        print("compare exit", run_eval_command(parser.parse_args(["--compare", sys.argv[1]])))
        print("eval exit", run_eval_command(parser.parse_args([sys.argv[2], "--tasks", "piqa"])))
        parser.parse_args(["--help"])
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mlkv.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, str(saved), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "compare exit 0" in proc.stdout and "| a | - | - | - | 50.00 |" in proc.stdout
    assert "eval exit 2" in proc.stdout
    assert "mlkv eval: error: " in proc.stderr and "pip install 'mlkv[eval]'" in proc.stderr
    assert "usage: mlkv eval" in proc.stdout and "--perplexity FILE" in proc.stdout and "default tasks:" in proc.stdout
