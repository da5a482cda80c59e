"""The paper pipeline, tiny, on CPU: every stage runs, resumes, and writes the report."""

import json

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from mlkv.data.paths import default_data_dir
from mlkv.reproduce.config import Settings
from mlkv.reproduce.pipeline import reproduce, resolve_data_dir

DATA = default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "corpus" / "gutenberg").is_dir(), reason="shared data not found")


def small(out, **kw):
    # The whole grid runs in the CLI's --smoke; here two plans keep the suite fast.
    return Settings.smoke_settings(str(out), data_dir=str(DATA), plans=["MHA-144", "MLKV-2"],
                                   distill_plans=["MLKV-2"], init_plans=["MLKV-2"], **kw)


def test_missing_data_names_flag_env_and_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.delenv("MLKV_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match=r"--data-dir DIR or set MLKV_DATA=DIR.*the_pile_deduplicated"):
        resolve_data_dir(str(tmp_path / "nowhere"))


@pytest.mark.slow
@needs_data
def test_smoke_pipeline_runs_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "run"
    report = reproduce(small(out, tasks=["lambada_openai", "piqa"], eval_workers=2,  # 2 processes evaluate
                             init_comparison=["mean", "first", "lsq"]))
    text = report.read_text()
    assert "| MLKV-2-distill | MLKV-2 (2x1) | pairwise | 2 | 256 |" in text
    assert "| MLKV-2-lm-mean | MLKV-2 (2x1) | mean |" not in text  # the init comparison has its own table
    results = json.loads((out / "results.json").read_text())
    assert {r["run"] for r in results["rows"]} == {"base", "MHA-144-lm", "MLKV-2-lm", "MLKV-2-distill",
                                                    "MLKV-2-lm-mean", "MLKV-2-lm-first", "MLKV-2-lm-lsq"}
    assert json.loads((out / "converted" / "MLKV-2-lsq" / "mlkv_conversion.json").read_text())["init"] == "lsq"
    assert {r["run"]: r["init"] for r in results["rows"]}["MLKV-2-lm-first"] == "first"
    assert all(r["gutenberg_ppl"] for r in results["rows"])
    assert all(r["piqa_acc"] is not None for r in results["rows"] if r["main"])
    assert all(r["piqa_acc"] is None for r in results["rows"] if not r["main"])
    assert (out / "plots" / "pareto.png").stat().st_size > 0 and (out / "plots" / "uptrain_loss.png").is_file()
    inits = results["init_comparison"]["MLKV-2"]
    assert set(inits["inits"]) == {"pairwise", "mean", "first", "lsq"} and inits["best"] in inits["inits"]
    assert "## Conversion inits" in text
    # finished runs keep only their final model; the summary states the disk use
    assert not list(out.glob("*/checkpoint*")) and not list(out.glob("uptrain/*/checkpoint*"))
    assert (out / "uptrain" / "MLKV-2-lm" / "model.safetensors").is_file()
    assert results["disk_bytes"] > 0 and f"- disk: {results['disk_bytes'] / 1e9:.2f} GB in the run folder" in text
    logs = {run: [json.loads(line) for line in (out / "uptrain" / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("MLKV-2-distill", "MLKV-2-lm")}
    assert all(r["hidden"] > 0 for r in logs["MLKV-2-distill"] if "loss" in r)  # KL + 10 x hidden-state distance
    assert all("hidden" not in r and "kl" not in r for r in logs["MLKV-2-lm"])
    capsys.readouterr()
    reproduce(small(out, tasks=["lambada_openai", "piqa"], init_comparison=["mean", "first", "lsq"],
                    export=True))  # all done: it only exports
    log = capsys.readouterr().out
    assert "base: done, skipping" in log
    assert "uptrain:" not in log and "eval:" not in log
    assert f"export: 7 models in {out / 'export'}" in log
    assert {p.name for p in (out / "export").iterdir()} == {r["run"] for r in results["rows"]}
    card = (out / "export" / "MLKV-2-distill" / "README.md").read_text()
    scores = json.loads((out / "eval" / "MLKV-2-distill.json").read_text(), parse_float=str)["results"]["piqa"]
    assert f"| piqa | acc | {scores['acc,none']} | {scores['acc_stderr,none']} |" in card
    assert "- structure: **2x1**" in card and "objective **distill** (teacher" in card and "init **pairwise**" in card
    assert json.loads((out / "export" / "base" / "config.json").read_text())["auto_map"]
    # a run cut short (here: one evaluation lost) still gets its report, and --report-only runs nothing
    (out / "eval" / "MLKV-2-distill.json").unlink()
    reproduce(small(out, tasks=["lambada_openai", "piqa"], init_comparison=["mean", "first", "lsq"],
                    report_only=True))
    log = capsys.readouterr().out
    assert "report only: 6 evaluations, 6 finished trainings, no benchmark" in log and "eval:" not in log
    assert "MLKV-2-distill" not in {r["run"] for r in json.loads((out / "results.json").read_text())["rows"]}
    assert not (out / "eval" / "MLKV-2-distill.json").exists()
    text = (out / "report.md").read_text()  # what the run recorded: card, dtype, time over its invocations
    assert "- card: CPU\n" in text and "- evaluation dtype: float32;" in text and "- time: not recorded" not in text


@pytest.mark.slow
@needs_data
def test_full_task_sets_build_their_requests_once(tmp_path, capsys):
    """Without --limit the harness's requests are built once, before the evaluation processes start, and every
    evaluation loads them."""
    s = Settings.smoke_settings(str(tmp_path / "run"), data_dir=str(DATA), plans=["MHA-144"], distill_plans=[],
                                init_plans=[], tasks=["openbookqa"], eval_workers=2)
    s.limit = None  # the whole 500-question set
    reproduce(s)
    assert "eval: built the requests of openbookqa once" in capsys.readouterr().out
    for name in ("base", "MHA-144-lm"):
        res = json.loads((tmp_path / "run" / "eval" / f"{name}.json").read_text())
        assert res["mlkv"]["request_cache"].startswith(str(tmp_path / "run" / "lm_eval_requests" / "requests-"))
        assert res["n-samples"]["openbookqa"]["effective"] == 500


@needs_data
def test_base_from_a_local_hf_checkpoint_skips_pretraining(tmp_path):
    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=50304, hidden_size=48, num_hidden_layers=12,
                                          num_attention_heads=12, intermediate_size=96, max_position_embeddings=256))
    hf.save_pretrained(tmp_path / "pythia")
    PreTrainedTokenizerFast(tokenizer_file=str(DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"),
                            eos_token="<|endoftext|>").save_pretrained(tmp_path / "pythia")
    out = tmp_path / "run"
    s = Settings.smoke_settings(str(out), data_dir=str(DATA), base=str(tmp_path / "pythia"), plans=["MLKV-2"],
                                distill_plans=[], init_plans=[], tasks=[])
    reproduce(s)
    assert json.loads((out / "base" / "done.json").read_text())["source"] == str(tmp_path / "pythia")
    assert not (out / "base" / "metrics.jsonl").exists()  # converted, not trained
    assert (out / "uptrain" / "MLKV-2-lm" / "model.safetensors").is_file()
    assert (out / "eval" / "MLKV-2-step0.json").is_file()  # a real base: every conversion evaluated at step 0


def test_plan_names_and_settings_guard(tmp_path):
    import argparse

    from mlkv.reproduce.command import add_reproduce_arguments, settings_from_args
    from mlkv.reproduce.config import check_settings
    parse = add_reproduce_arguments(argparse.ArgumentParser()).parse_args
    s = settings_from_args(parse(["--out", str(tmp_path), "--plans", "mlkv-6", "mha-144"]))
    assert s.plans == ["MLKV-6", "MHA-144"] and s.distill_plans == ["MLKV-6"] and s.init_plans == ["MLKV-6"]
    tuned = settings_from_args(parse(["--out", str(tmp_path), "--init-seeds", "2", "--eval-workers", "3"]))
    assert tuned.init_seeds == 2 and tuned.eval_workers == 3
    assert (tuned.uptrain_lr, tuned.distill_hidden) == (6e-4, 10.0)  # the paper's lr; hidden-state distillation
    recipe = settings_from_args(parse(["--out", str(tmp_path), "--uptrain-lr", "1.2e-3", "--distill-hidden", "0"]))
    assert (recipe.uptrain_lr, recipe.distill_hidden) == (1.2e-3, 0.0)
    smoke = settings_from_args(parse(["--out", str(tmp_path), "--smoke", "--plans", "MHA-144"]))
    assert smoke.distill_plans == [] and smoke.init_plans == []
    check_settings(Settings(out=str(tmp_path)), tmp_path)
    with pytest.raises(ValueError, match=r"made with other settings: hidden_size \(384 -> 512\)"):
        check_settings(Settings(out=str(tmp_path), hidden_size=512), tmp_path)
    with pytest.raises(ValueError, match=r"distill_hidden \(10.0 -> 0.0\)"):
        check_settings(Settings(out=str(tmp_path), distill_hidden=0.0), tmp_path)
    # A folder from before --uptrain-lr / --distill-hidden / --init existed (runs 1-3): logits-only distillation at
    # 6e-4, main runs from the mean init.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    check_settings(Settings(out=str(legacy)), legacy)
    saved = json.loads((legacy / "settings.json").read_text())
    (legacy / "settings.json").write_text(json.dumps({k: v for k, v in saved.items()
                                                      if k not in ("uptrain_lr", "distill_hidden", "init")}))
    check_settings(Settings(out=str(legacy), distill_hidden=0.0, init="mean"), legacy)  # resumes as it was made
    with pytest.raises(ValueError, match=r"distill_hidden \(0.0 -> 10.0\), init \('mean' -> 'pairwise'\)"):
        check_settings(Settings(out=str(legacy)), legacy)


def test_eval_retries_a_failed_worker_alone(tmp_path, monkeypatch, capsys):
    """A model whose evaluation fails in a worker (e.g. out of memory beside the others) is evaluated again alone;
    the others keep their results."""
    from concurrent.futures import ThreadPoolExecutor

    import mlkv.reproduce.evaluate as rp
    from mlkv.reproduce.config import resolve_settings

    calls = []

    def fake_eval(s, data, name, folder, path):
        calls.append(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"name": name}))

    def worker(s, data, name, folder, path, workers, share):
        if name == "b":
            raise RuntimeError("CUDA out of memory. Tried to allocate 244.00 MiB")
        fake_eval(s, data, name, folder, path)
        return name

    monkeypatch.setattr(rp, "eval_one", fake_eval)
    monkeypatch.setattr(rp, "_eval_worker", worker)
    monkeypatch.setattr(rp, "_make_pool", lambda n: ThreadPoolExecutor(n))
    s = resolve_settings(Settings(out=str(tmp_path), eval_workers=2, device="cpu"))
    results = rp.stage_eval(s, tmp_path, {n: tmp_path / n for n in "abc"}, tmp_path)
    assert {k: v["name"] for k, v in results.items()} == {"a": "a", "b": "b", "c": "c"}
    assert sorted(calls) == ["a", "b", "c"] and calls[-1] == "b"  # b only after the pool, alone
    assert "b failed in a worker (RuntimeError: CUDA out of memory" in capsys.readouterr().out


@needs_data
def test_a_run_stopped_by_sigterm_keeps_its_time(tmp_path, monkeypatch):
    """`timeout` (SIGTERM) mid-stage: the run exits with 128 + 15, and its seconds still add up in timing.json, so
    the report of a run resumed across device calls states the whole time."""
    import os
    import signal
    import time

    import mlkv.reproduce.pipeline as rp

    def stopped(*args):
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises SystemExit before this ends
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(rp, "stage_base", stopped)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        reproduce(small(tmp_path / "run"))
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert json.loads((tmp_path / "run" / "timing.json").read_text())["earlier_seconds"] >= 0.2
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back


@needs_data
def test_a_training_stopped_by_a_signal_is_not_marked_done(tmp_path, monkeypatch):
    """``train`` takes SIGTERM itself (it saves a checkpoint and returns ``interrupted``): the stage must stay
    unfinished for the resume, and the pipeline stop with the signal's exit code instead of going on."""
    import signal

    import mlkv.training.loop

    monkeypatch.setattr(mlkv.training.loop, "train", lambda cfg: {"interrupted": True, "stop_signal": signal.SIGTERM,
                                                          "steps": 3})
    with pytest.raises(SystemExit) as exit_info:
        reproduce(small(tmp_path / "run"))
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "run" / "base" / "done.json").exists()
    assert json.loads((tmp_path / "run" / "timing.json").read_text())["earlier_seconds"] >= 0


def test_a_temporary_marker_left_by_a_kill_goes_when_the_run_is_marked_done(tmp_path, capsys):
    from mlkv.reproduce.log import mark_done

    run = tmp_path / "uptrain" / "MLKV-2-lm"
    run.mkdir(parents=True)
    (run / ".done.json.tmp-4242-0123abcd").write_text('{"plan": ')  # killed before its rename
    mark_done(run, {"plan": "MLKV-2"})
    assert sorted(p.name for p in run.iterdir()) == ["done.json"]
    assert not list(run.parent.glob(".*"))  # nor the lock it held
    assert f"removed {run / '.done.json.tmp-4242-0123abcd'}" in capsys.readouterr().err


def test_a_checkpoint_left_by_a_kill_after_the_done_marker_goes_when_a_rerun_skips_the_run(tmp_path):
    """A finished run's checkpoint is removed after its done marker is written; a kill between the two leaves it,
    and the next invocation, which skips the run, removes it -- unless the marker says --keep-checkpoints, or
    predates that record."""
    from mlkv.reproduce.pipeline import _finish_training, stage_uptrain

    s = Settings.smoke_settings(str(tmp_path), plans=["MLKV-2"], distill_plans=["none"], init_plans=["none"])
    run = tmp_path / "uptrain" / "MLKV-2-lm"
    (run / "checkpoint").mkdir(parents=True)
    _finish_training(s, run, {}, {"plan": "MLKV-2"})
    assert json.loads((run / "done.json").read_text()) == {"plan": "MLKV-2", "keep_checkpoints": False}
    assert not (run / "checkpoint").exists()
    for keep, kept in ((False, False), (True, True), (None, True)):
        marker = {"plan": "MLKV-2", **({} if keep is None else {"keep_checkpoints": keep})}
        for name in ("checkpoint", "checkpoint.old"):
            (run / name).mkdir(exist_ok=True)
        (run / "done.json").write_text(json.dumps(marker))
        assert stage_uptrain(s, tmp_path, tmp_path / "base", {}, tmp_path) == {"MLKV-2-lm": run}  # nothing trains
        assert [(run / name).exists() for name in ("checkpoint", "checkpoint.old")] == [kept, kept], marker


@needs_data
def test_a_second_run_into_a_busy_output_folder_gets_a_named_error_before_any_work(tmp_path):
    from mlkv.files import FolderInUseError, folder_lock

    out = tmp_path / "run"
    with folder_lock(out, "mlkv reproduce --out run"):
        with pytest.raises(FolderInUseError, match=r"is in use by pid \d+ .*\(mlkv reproduce --out run, started"):
            reproduce(small(out))
    assert not out.exists() or not any(out.iterdir())


@needs_data
def test_a_rerun_removes_what_a_killed_run_left_half_written_anywhere_in_its_folder(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps({"seq_len": -1}))  # other settings: the rerun stops at once
    stale = [out / ".results.json.tmp-99999-deadbeef", out / "eval" / ".base.json.tmp-99999-deadbeef"]
    for path in stale:
        path.write_text("{")
    with pytest.raises(ValueError, match="was made with other settings"):
        reproduce(small(out))
    assert not any(path.exists() for path in stale)
    assert capsys.readouterr().err.count("left by an interrupted earlier run") == 2


def _made(settings: Settings, out) -> Settings:
    """``settings`` as a run into ``out`` records them before its first stage."""
    from mlkv.reproduce.config import check_settings, resolve_settings

    s = resolve_settings(settings)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(s, out)
    return settings


def test_report_only_on_a_folder_with_nothing_finished_says_not_measured_and_reads_no_data(tmp_path, capsys):
    out = tmp_path / "run"
    settings = Settings.smoke_settings(str(out), data_dir=str(tmp_path / "no-data"), plans=["MLKV-2"],
                                       report_only=True)
    with pytest.raises(FileNotFoundError, match=r"--out .*run: no run there \(no settings.json\)"):
        reproduce(settings)
    report = reproduce(_made(settings, out))
    log = capsys.readouterr().out
    assert "report only: 0 evaluations, 0 finished trainings, no benchmark" in log
    text = report.read_text()
    assert "No uptrained model was evaluated." in text and "not measured" in text
    assert "- card: not recorded\n- time: not recorded" in text and "- evaluation dtype: no evaluation;" in text
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["report.md", "results.json", "settings.json"]


def test_report_only_from_the_command_line_prints_its_json_line_without_a_recorded_time(tmp_path, capsys):
    from mlkv.cli import main

    out = tmp_path / "run"
    argv = ["reproduce", "--smoke", "--out", str(out), "--data-dir", str(tmp_path), "--plans", "MLKV-2",
            "--report-only"]
    assert main(argv) == 2 and "no run there" in capsys.readouterr().err
    _made(Settings.smoke_settings(str(out), data_dir=str(tmp_path), plans=["MLKV-2"]), out)
    assert main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["seconds"] is None and last["rows"] == 0


@needs_data
def test_report_only_runs_beside_a_live_run_holding_the_folder(tmp_path, capsys):
    from mlkv.files import folder_lock

    out = tmp_path / "run"
    with folder_lock(out, "mlkv reproduce"):  # the live run
        reproduce(_made(small(out, report_only=True), out))
    assert "report only: 0 evaluations" in capsys.readouterr().out and (out / "report.md").is_file()
