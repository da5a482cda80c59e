"""What a reproduction will run and evaluate, decided without weights: the defaults of each pipeline, the names,
the skipped inits, and the checks that fail before any work."""

import argparse

import pytest

from mlkv.cli import main
from mlkv.reproduce.command import add_reproduce_arguments, settings_from_args
from mlkv.reproduce.config import Settings, resolve_settings
from mlkv.reproduce.runs import comparison_inits, conversions, init_of, plan_of, planned_runs, step0_runs, task_runs

#: SmolLM2-135M's attention shape, given so that no GGUF is read.
SMOL = dict(spec="smollm2", kind="gguf", layers=30, heads=9, kv_heads=3, head_dim=64)


def smol(**kw) -> Settings:
    return resolve_settings(Settings(out="x", base="smollm2", source=SMOL, **kw))


def names(s: Settings) -> list[str]:
    return [r["name"] for r in planned_runs(s)]


def test_smollm2_defaults_are_the_gqa_grid_with_its_control_and_distilled_pair():
    s = smol()
    assert s.plans == ["30x3", "10x3", "30x1", "5x3", "15x1", "6x1", "3x1", "2x1", "1x1"]
    assert (s.distill_plans, s.init, s.init_comparison, s.step0) == (["6x1", "10x3", "30x1"], "pairwise", [], "tasks")
    assert (s.seq_len, s.micro_batch_size, s.uptrain_tokens, s.val_points) == (1024, 32, "30M", 8)
    assert names(s) == [f"{p}-lm" for p in s.plans] + ["6x1-distill", "10x3-distill", "30x1-distill"]


def test_smollm2_evaluates_every_conversion_at_step_0_but_not_the_original_twice():
    s = smol()
    step0 = step0_runs(s)
    assert list(step0) == [f"{p}-step0" for p in s.plans if p != "30x3"]  # 30x3 is the original itself: "base"
    assert step0["6x1-step0"] == ("6x1", "pairwise")
    assert task_runs(s) == {"base", *step0, *names(s)}
    assert conversions(s) == [(p, "pairwise") for p in s.plans[1:]]


def test_smollm2_smoke_is_two_plans_a_few_steps_and_limited_tasks():
    s = smol(smoke=True)
    assert (s.plans, s.distill_plans, s.init_plans) == (["30x3", "6x1"], ["6x1"], [])
    assert names(s) == ["30x3-lm", "6x1-lm", "6x1-distill"] and list(step0_runs(s)) == ["6x1-step0"]
    assert (s.device, s.bench, s.limit, s.seq_len, s.uptrain_tokens) == ("cpu", False, 2, 64, "256")
    assert task_runs(s) == {"base", "6x1-step0", "30x3-lm", "6x1-lm", "6x1-distill"}


def test_plan_names_are_spelled_one_way_per_shape():
    assert smol(plans=["mha", "mlkv-6", "6X1", "gqa-30"]).plans == ["30x3", "6x1", "30x1"]
    paper = resolve_settings(Settings(out="x", plans=["mlkv-6", "6x1", "12x12"]))
    assert paper.plans == ["MLKV-6", "MHA-144"]


def test_an_init_that_is_the_same_function_is_skipped_and_the_reason_kept():
    s = smol(init_plans=["6x1", "15x1", "30x1", "1x1"], init_comparison=["mean", "first", "lsq"],
             plans=["30x3", "30x1", "15x1", "6x1", "1x1"])
    assert comparison_inits(s, "6x1") == (["mean", "first", "lsq"], {})  # 5 layers per producer
    kept, skipped = comparison_inits(s, "15x1")  # 2 layers per producer: the mean is the pairwise running average
    assert kept == ["first", "lsq"]
    assert skipped == {"mean": "the same function as pairwise on 15x1 (no producer serves more than two layers)"}
    kept, skipped = comparison_inits(s, "30x1")  # no layer shared: every weight-only init is one function
    assert kept == ["lsq"] and set(skipped) == {"mean", "first"} and "no layer is shared" in skipped["first"]
    assert "15x1-lm-mean" not in names(s) and {"15x1-lm-first", "15x1-lm-lsq", "1x1-lm-mean"} <= set(names(s))
    assert ("30x1", "lsq") in conversions(s) and step0_runs(s)["30x1-step0-lsq"] == ("30x1", "lsq")
    assert "30x1-step0-lsq" not in task_runs(s) and "30x1-lm-lsq" not in task_runs(s)  # judged on perplexity


def test_the_pretrained_pipeline_keeps_the_paper_grid_and_its_init_comparison():
    s = resolve_settings(Settings(out="x"))
    runs = [(r["plan"], r["objective"], r["init"]) for r in planned_runs(s)]
    assert len(runs) == 9 + 6 + 3 and s.step0 == "off" and step0_runs(s) == {}
    assert ("MLKV-6", "lm", "first") in runs and ("MLKV-6", "lm", "mean") not in runs  # mean == pairwise on 6x1
    assert ("MLKV-2", "lm", "mean") in runs
    seeded = names(resolve_settings(Settings(out="x", init_seeds=2)))
    assert len(seeded) == 18 + 5 and len(set(seeded)) == len(seeded)
    assert {"MLKV-6-lm-s1", "MLKV-6-lm-first-s1", "MLKV-2-lm-mean-s1", "MLKV-2-lm-first"} <= set(seeded)


def test_run_names_give_back_their_plan_and_init():
    assert [plan_of(r, "30x3") for r in ("base", "6x1-lm", "10x3-distill", "6x1-step0-lsq", "2x1-lm-mean-s1")] \
        == ["30x3", "6x1", "10x3", "6x1", "2x1"]
    assert [init_of(r, "pairwise") for r in ("base", "6x1-lm", "6x1-step0-lsq", "MLKV-2-lm-first-s1")] \
        == [None, "pairwise", "lsq", "first"]


def _parse(*flags):
    return settings_from_args(add_reproduce_arguments(argparse.ArgumentParser()).parse_args(list(flags)))


def test_every_bad_value_is_refused_before_any_work_naming_its_flag():
    cases = [(["--plans", "13x1"], r"--plans 13x1: number of producer layers \(13\) must be between 1 and"),
             (["--plans", "MLKV-6", "--distill-plans", "MLKV-2"], r"--distill-plans MLKV-2: not among --plans"),
             (["--init-comparison", "median"], r"--init-comparison median: each must be one of mean, pairwise"),
             (["--uptrain-tokens", "5Q"], r"--uptrain-tokens: bad token count '5Q'"),
             (["--uptrain-lr=-1e-3"], r"--uptrain-lr must be positive, got -0.001"),
             (["--distill-hidden=-1"], r"--distill-hidden must be >= 0, got -1.0"),
             (["--limit", "0"], r"--limit must be at least 1, got 0"),
             (["--checkpoints=-1"], r"--checkpoints must be at least 0, got -1"),
             (["--tasks", "piqaa"], r"unknown task\(s\): piqaa. Supported with local data: ")]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message):
            _parse("--out", "x", *flags)
    with pytest.raises(FileNotFoundError, match=r"--base nowhere: neither 'pretrain', a known model"):
        _parse("--base", "nowhere")


def test_checkpoints_split_every_training_run_and_a_smoke_saves_only_its_last_step_unless_asked(tmp_path):
    from mlkv.reproduce.pipeline import _train_common

    def save_every(*flags):
        s = _parse("--out", str(tmp_path), *flags)
        return s.checkpoints, _train_common(s, tmp_path, s.uptrain_tokens, 0)["save_every"]

    assert save_every() == (10, 153 // 10)  # 5M tokens at 16 x 2048 a step: 153 steps
    assert save_every("--checkpoints", "3") == (3, 153 // 3)
    assert save_every("--smoke") == (0, 10**9)  # 8 steps
    assert save_every("--smoke", "--checkpoints", "4") == (4, 2)


def test_a_misspelled_task_fails_at_once_with_the_commands_prefix(tmp_path, capsys):
    assert main(["reproduce", "--out", str(tmp_path / "run"), "--tasks", "piqaa"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlkv reproduce: error: unknown task(s): piqaa.")
    assert not (tmp_path / "run").exists()  # nothing started


def test_none_turns_off_distillation_and_the_init_comparison():
    s = _parse("--out", "x", "--distill-plans", "none", "--init-comparison", "none")
    assert s.distill_plans == [] and s.init_comparison == [] and names(s) == [f"{p}-lm" for p in s.plans]


def test_a_llama_folder_is_a_real_base_with_the_grid_of_its_shape(tmp_path):
    import json

    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128}))
    s = resolve_settings(Settings(out="x", base=str(folder)))  # only its config is read
    assert s.source == dict(spec=str(folder), kind="folder", layers=4, heads=4, kv_heads=2, head_dim=16)
    assert s.plans == ["4x2", "2x2", "4x1", "1x2", "2x1", "3x1", "1x1"]
    assert (s.distill_plans, s.init_plans, s.step0) == (["2x2", "4x1"], [], "tasks")


def test_a_missing_shard_is_named_before_any_work(tmp_path):
    from mlkv.reproduce.pipeline import reproduce

    corpus = tmp_path / "data" / "corpus" / "gutenberg"
    corpus.mkdir(parents=True)
    (corpus / "train_00.jsonl.xz").write_bytes(b"")
    s = Settings(out=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), train_shards=["train_09.jsonl.xz"])
    with pytest.raises(FileNotFoundError, match=r"--train-shards train_09.jsonl.xz: .*train_09.jsonl.xz not found "
                                                r"\(shards there: train_00.jsonl.xz\)"):
        reproduce(s)
    assert not (tmp_path / "run").exists()


def test_evaluations_run_in_bfloat16_on_cuda_float32_on_cpu_unless_eval_dtype_says(monkeypatch):
    from mlkv.reproduce import evaluate

    monkeypatch.setattr(evaluate, "_cuda", lambda: True)
    assert evaluate.eval_dtype(smol()) == "bfloat16"  # device left to the machine: CUDA here
    assert evaluate.eval_dtype(smol(device="cuda:1")) == "bfloat16"
    assert evaluate.eval_dtype(smol(device="cpu")) == "float32"
    assert evaluate.eval_dtype(smol(eval_dtype="float32")) == "float32"
    monkeypatch.setattr(evaluate, "_cuda", lambda: False)
    assert evaluate.eval_dtype(smol()) == "float32"
    s = settings_from_args(add_reproduce_arguments(argparse.ArgumentParser()).parse_args(["--eval-dtype", "float16"]))
    assert s.eval_dtype == "float16"
