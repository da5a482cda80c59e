"""``mlkv reproduce``'s flags: declared once by ``Settings``, the same names as before, each with help."""

import argparse

from mlkv.reproduce.command import add_reproduce_arguments, settings_from_args
from mlkv.reproduce.config import Settings, resolve_settings

FLAGS = ["--out", "--smoke", "--data-dir", "--base", "--hidden-size", "--seq-len", "--micro-batch-size",
         "--base-tokens", "--uptrain-tokens", "--train-shards", "--tasks", "--limit", "--ppl-limit", "--plans",
         "--no-bench", "--eval-batch-size", "--eval-workers", "--init-seeds", "--uptrain-lr", "--distill-hidden",
         "--compile", "--device", "--init", "--init-plans", "--init-comparison", "--step0", "--distill-plans",
         "--keep-checkpoints", "--no-keep-checkpoints", "--val-points", "--checkpoints", "--eval-dtype",
         "--report-only"]


def _parser():
    return add_reproduce_arguments(argparse.ArgumentParser())


def test_flags_keep_their_names_and_all_have_help():
    parser = _parser()
    options = {o for action in parser._actions for o in action.option_strings}
    assert set(FLAGS) <= options
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]


def test_defaults_are_the_settings_and_smoke_keeps_the_flags_given():
    assert settings_from_args(_parser().parse_args([])) == resolve_settings(Settings())
    assert Settings().base == "pretrain" and Settings().keep_checkpoints is False
    s = settings_from_args(_parser().parse_args(["--smoke", "--device", "cuda", "--eval-workers", "3",
                                                 "--hidden-size", "64", "--no-bench"]))
    assert (s.device, s.eval_workers, s.hidden_size, s.bench) == ("cuda", 3, 64, False)
    smoke = Settings.smoke_settings("runs/reproduce")
    assert (s.seq_len, s.limit, s.plans, s.out) == (smoke.seq_len, smoke.limit, smoke.plans, "runs/reproduce")
