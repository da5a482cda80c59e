"""A run's output folder (mlkv.training.outdir): one writer at a time, no run written over another model or other
files without --overwrite, a final save that a kill cannot leave half-done, and a full disk that leaves no
temporary checkpoint behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import mlkv  # noqa: F401  (registers MLKV with the Auto classes)
from mlkv.checkpoints import require_checkpoint
from mlkv.cli import main as cli_main
from mlkv.diskspace import disk_full
from mlkv.errors import UsageError
from mlkv.training import train
from mlkv.training.checkpoint import checkpoint_problem, read_state
from mlkv.training.outdir import clean_out_folder, prepare_out_folder, remove_earlier_run, save_final_model
from trainkit import SRC, cli_flags, hidden_entries, make_config, needs_data, read_metrics


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("outdir")


# ---- one writer -----------------------------------------------------------------------------------------------------
HOLDER = """
import json, pathlib, sys, time
from mlkv.training import TrainConfig, TrainHooks, train

def hold(step, model):  # keep the folder (and its lock) busy until the test says go
    if step == 1:
        print("training", flush=True)
        while not pathlib.Path(sys.argv[2]).exists():
            time.sleep(0.05)

summary = train(TrainConfig(**json.loads(sys.argv[1])), hooks=TrainHooks(after_step=hold))
print(json.dumps({"steps": summary["steps"]}), flush=True)
"""


@pytest.mark.slow
@needs_data
def test_a_second_train_into_the_same_folder_gets_a_named_error_and_the_first_loses_nothing(workdir, tmp_path):
    out, release = tmp_path / "run", tmp_path / "release"
    cfg = make_config(workdir, out, steps=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), json.dumps(vars(cfg)), str(release)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "training"
        second = subprocess.run([sys.executable, "-m", "mlkv", "train", *cli_flags(cfg)], env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"mlkv train: error: {out} is in use by pid {first.pid} on " in second.stderr
        assert "(mlkv train, started" in second.stderr and "Traceback" not in second.stderr
    finally:
        release.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1]) == {"steps": 2}
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 2]  # 2 steps, an evaluation; nothing of the second run
    require_checkpoint(out)
    assert hidden_entries(out) == []  # the lock file is gone with its holder


# ---- what the folder may hold ---------------------------------------------------------------------------------------
def test_a_folder_with_another_model_or_other_files_is_refused_without_overwrite(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_text("weights")
    with pytest.raises(FileExistsError, match=r"model already holds a model \(config.json, model.safetensors\): "
                                              r"pass --overwrite to replace it with this run's model \(the old "
                                              r"files stay until the new model is saved\), or choose another --out"):
        prepare_out_folder(model, resuming=False, overwrite=False)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes already holds files that are not a training run's "
                                              r"\(todo.md\): pass --overwrite"):
        prepare_out_folder(notes, resuming=False, overwrite=False)
    prepare_out_folder(notes, resuming=False, overwrite=True)
    assert (notes / "todo.md").read_text() == "mine"  # --overwrite replaces a model, it deletes no one's notes
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out .*file is a file, not a folder"):
        prepare_out_folder(tmp_path / "file", resuming=False, overwrite=True)


def test_overwrite_removes_the_earlier_runs_state_at_once_and_keeps_its_model_until_the_new_one(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "trainer_state.json").write_text('{"step": 3}')
    (out / "metrics.jsonl").write_text("{}\n")
    for name in ("config.json", "model.safetensors"):
        (out / name).write_text("old")
    with pytest.raises(FileExistsError, match="already holds a checkpoint: pass --resume to continue it, "
                                              "--overwrite to start again, or choose another --out"):
        prepare_out_folder(out, resuming=False, overwrite=False)
    earlier = prepare_out_folder(out, resuming=False, overwrite=True)
    assert sorted(p.name for p in earlier) == ["checkpoint", "metrics.jsonl"] and (out / "checkpoint").is_dir()
    remove_earlier_run(earlier)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.slow
@needs_data
def test_an_overwrite_run_refused_for_its_inputs_leaves_the_earlier_run_as_it_was(workdir, tmp_path):
    """``--overwrite`` removes the earlier run only once the new run's inputs are checked: a run refused for its
    ``--seq-len`` deletes nothing."""
    out = train(make_config(workdir, tmp_path / "run", steps=1))["out"]
    before = sorted(p.name for p in Path(out).iterdir())
    with pytest.raises(UsageError, match="--seq-len"):
        train(make_config(workdir, out, steps=1, overwrite=True, seq_len=100_000))
    assert sorted(p.name for p in Path(out).iterdir()) == before and "checkpoint" in before


@needs_data
def test_train_refuses_a_model_folder_and_overwrites_it_in_place_when_asked(workdir, tmp_path):
    """Uptraining a model into its own folder needs --overwrite; the new model replaces the old one's files."""
    base = train(make_config(workdir, tmp_path / "base", steps=1))["out"]
    shutil.rmtree(f"{base}/checkpoint")
    os.remove(f"{base}/metrics.jsonl")  # a model folder, as `mlkv convert` writes one
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    with pytest.raises(FileExistsError, match=r"base already holds a model \(config.json, "):
        train(make_config(workdir, base, model=base, steps=1))
    summary = train(make_config(workdir, base, model=base, steps=1, overwrite=True))
    assert summary["origin"] == "checkpoint" and not summary["interrupted"]
    after = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert not all(torch.equal(before[k], after[k]) for k in before)
    assert hidden_entries(tmp_path / "base") == []


# ---- the final save -------------------------------------------------------------------------------------------------
OLD = ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"]
NEW = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
       "model.safetensors.index.json", "tokenizer.json"]


class Killed(BaseException):
    """Stands for a kill: nothing catches it, no cleanup runs."""


def write_new(folder):
    for name in NEW:
        (folder / name).write_text("new")


def test_a_final_save_killed_at_any_rename_leaves_the_old_model_no_model_or_the_new_one(tmp_path, monkeypatch,
                                                                                         capsys):
    real_replace = os.replace
    kill_at = 0
    while True:
        out = tmp_path / f"run{kill_at}"
        out.mkdir()
        (out / "metrics.jsonl").write_text("{}\n")
        for name in OLD:
            (out / name).write_text("old")
        calls = []

        def replace(src, dst):
            if len(calls) == kill_at:
                raise Killed
            calls.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            save_final_model(out, write_new)
            completed = True
        except Killed:
            completed = False
        monkeypatch.undo()
        model = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if (out / "config.json").exists():
            tag = (out / "config.json").read_text()
            expected = OLD if tag == "old" else NEW
            assert model == sorted(expected + ["metrics.jsonl"]), (kill_at, model)
            assert all((out / name).read_text() == tag for name in expected)
        else:
            with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
                require_checkpoint(out)
        if completed:
            break
        clean_out_folder(out)  # what the next run does first, holding the lock
        assert "left by an interrupted earlier run" in capsys.readouterr().err
        save_final_model(out, write_new)
        assert sorted(p.name for p in out.iterdir()) == sorted(NEW + ["metrics.jsonl"])
        kill_at += 1
    assert kill_at == len(OLD) + len(NEW)  # every rename was a kill point once


# ---- a full disk ----------------------------------------------------------------------------------------------------
def torch_write_error() -> RuntimeError:
    """What ``torch.save`` raises when a write into its Python file fails: a RuntimeError, the OSError its context."""
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904
    except RuntimeError as exc:
        return exc


def test_a_full_disk_is_recognised_inside_torch_saves_runtime_error_and_safetensors_message():
    assert disk_full(torch_write_error())
    assert disk_full(Exception("Error while serializing: IoError(No space left on device (os error 28))"))
    assert not disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    assert not disk_full(OSError(errno.EACCES, os.strerror(errno.EACCES)))


@needs_data
def test_a_full_disk_during_a_checkpoint_leaves_no_temporary_and_the_cli_names_the_disk(workdir, tmp_path,
                                                                                       monkeypatch, capsys):
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def full_disk(obj, f, *args, **kwargs):  # the second checkpoint's optimizer.pt: 1 MiB in, then ENOSPC
        saves.append(1)
        if len(saves) < 3:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"\0" * 2**20)
        raise torch_write_error()

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = make_config(workdir, out, steps=3, save_every=1)
    assert cli_main(["train", *cli_flags(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"mlkv train: error: no space left on the device writing {out / 'checkpoint'}: free some disk space" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.jsonl"]  # no checkpoint.tmp
    assert read_state(out / "checkpoint")["step"] == 1 and checkpoint_problem(out / "checkpoint") is None
    monkeypatch.undo()
    assert cli_main(["train", *cli_flags(cfg, resume=True)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["start_step"] == 1
    assert hidden_entries(out) == [] and not (out / "checkpoint.old").exists()
