"""Resuming a run (mlkv.training.resume, mlkv.training.checkpoint): only under the settings it started with, from
the newest intact checkpoint (checksums verified, checkpoint.old as the fallback), and every unreadable file a named
error that says what to do."""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest

from mlkv.cli import main as cli_main
from mlkv.training import train
from mlkv.training.checkpoint import CorruptCheckpointError, read_state
from mlkv.training.resume import ResumeMismatchError
from trainkit import cli_flags, make_config, needs_data, step_losses, write_config

pytestmark = needs_data
KW = dict(steps=3, save_every=1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def full(workdir):
    """An uninterrupted run of 3 steps: its per-step losses."""
    train(make_config(workdir, workdir / "full", **KW))
    return step_losses(workdir / "full")


@pytest.fixture(scope="module")
def stopped(workdir):
    """The same run stopped after step 2: checkpoint/ (step 2) and checkpoint.old/ (step 1)."""
    out = workdir / "stopped"
    train(make_config(workdir, out, stop_after_steps=2, **KW))
    return out


@pytest.fixture
def run(stopped, tmp_path):
    """A copy of the stopped run to damage."""
    return shutil.copytree(stopped, tmp_path / "run")


def flip_bits(path, count=200):
    """Invert ``count`` bits (8 a byte) in the middle of the file."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count // 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ---- the settings that define a run ---------------------------------------------------------------------------------
def test_resume_refuses_changed_settings_naming_each_with_both_values(workdir, run):
    with pytest.raises(ResumeMismatchError, match=r"run was started with other settings: --seed was 0, now 1; "
                                                  r"--micro-batch-size was 4, now 2\. Resume it with the settings it "
                                                  r"started with, start it again \(--overwrite instead of --resume\), "
                                                  r"or choose another --out"):
        train(make_config(workdir, run, resume=True, seed=1, micro_batch_size=2, **KW))
    other = write_config(workdir, "other.json")
    with pytest.raises(ResumeMismatchError, match=r"--model was '.*tiny.json', now '.*other.json'"):
        train(make_config(workdir, run, model=other, resume=True, **KW))
    with pytest.raises(ResumeMismatchError, match=r"--data was \['.*val.jsonl.xz'\], now \['.*other.jsonl'\]"):
        train(make_config(workdir, run, resume=True, data=[str(other.with_suffix(".jsonl"))], **KW))
    with pytest.raises(ResumeMismatchError, match=r"the training tokens \(fingerprint of the token store\) was "
                                                  r"'[0-9a-f]{16}', now '[0-9a-f]{16}'"):
        train(make_config(workdir, run, resume=True, val_fraction=0.0, **KW))  # both books
    with pytest.raises(ResumeMismatchError, match=r"the number of optimizer steps \(from --steps or --tokens\) was "
                                                  r"3, now 4"):
        train(make_config(workdir, run, resume=True, **{**KW, "steps": 4}))


def test_how_a_run_executes_may_change_on_resume(workdir, run, full):
    summary = train(make_config(workdir, run, resume=True, log_every=2, eval_batches=3, save_every=0, steps=3))
    assert summary["start_step"] == 2 and summary["steps"] == 3
    assert step_losses(run)[3] == full[3]


# ---- checksums and the fallback -------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flip model.safetensors", "truncate optimizer.pt", "truncate rng_rank0.pt",
                                    "truncate trainer_state.json"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before_with_a_warning(workdir, run, full, damage, caplog):
    how, name = damage.split()
    (flip_bits if how == "flip" else truncate)(run / "checkpoint" / name)
    with caplog.at_level(logging.WARNING, logger="mlkv.training.checkpoint"):
        summary = train(make_config(workdir, run, resume=True, **KW))
    problem = ("cannot be read" if name == "trainer_state.json"
               else "is corrupt: its sha256 differs from the one recorded when it was written")
    assert f"checkpoint/{name} {problem}" in caplog.text or f"checkpoint/{name}: {problem}" in caplog.text
    assert f"resuming from the checkpoint before it ({run / 'checkpoint.old'}, step 1)" in caplog.text
    assert summary["start_step"] == 1 and summary["steps"] == 3
    assert step_losses(run) == full  # steps 2 and 3 again, as in the uninterrupted run


def test_without_an_intact_checkpoint_resume_names_the_file_and_what_to_do(workdir, run, capsys):
    truncate(run / "checkpoint" / "optimizer.pt")
    shutil.rmtree(run / "checkpoint.old")
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint/optimizer.pt is corrupt: its sha256 differs from "
                                                     r"the one recorded when it was written; no intact earlier "
                                                     r"checkpoint \(checkpoint.old\) to fall back to: restore the "
                                                     r"file, or start the run again with --overwrite"):
        train(make_config(workdir, run, resume=True, **KW))
    summary = train(make_config(workdir, run, overwrite=True, **KW))  # the way out it names
    assert summary["start_step"] == 0 and summary["steps"] == 3


@pytest.mark.parametrize("name, message", [
    ("optimizer.pt", r"checkpoint/optimizer.pt: cannot be read \(.+\); the file is truncated or corrupt: no intact "
                     r"earlier checkpoint \(checkpoint.old\) to fall back to: restore the file, or start the run "
                     r"again with --overwrite"),
    ("rng_rank0.pt", r"checkpoint/rng_rank0.pt: cannot be read \(.+\); the file is truncated or corrupt"),
    ("model.safetensors", r"the checkpoint .*checkpoint: its weights \(model.safetensors\) cannot be read \(Error "
                          r"while deserializing header.*\): a file is truncated or corrupt; restore it, or start the "
                          r"run again with --overwrite"),
])
def test_unreadable_files_of_a_checkpoint_without_checksums_are_named_errors(workdir, run, name, message, capsys):
    """A checkpoint written before checksums were recorded is read as it is: an unreadable file is a one-line error
    of the CLI naming it, never a traceback."""
    shutil.rmtree(run / "checkpoint.old")
    state = read_state(run / "checkpoint")
    del state["files"]
    (run / "checkpoint" / "trainer_state.json").write_text(json.dumps(state))
    truncate(run / "checkpoint" / name)
    assert cli_main(["train", *cli_flags(make_config(workdir, run, resume=True, **KW))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("mlkv train: error: ")], err[-2000:]
    assert re.search(message, err), err[-2000:]
