"""The shared checkpoint helpers: atomic writes, the output-folder lock, dtype names and checkpoint checks."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mlkv.checkpoints import require_checkpoint
from mlkv.files import FolderInUseError, atomic_dir, atomic_json, atomic_write, clean_stale_temps_under, folder_lock
from mlkv.model.loading import parse_dtype

SRC = Path(__file__).resolve().parents[1] / "src"


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = atomic_write(tmp_path / "a.txt", "old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    atomic_json(path, {"x": 1})
    assert path.read_text() == '{\n  "x": 1\n}\n'


def test_atomic_dir_refuses_an_existing_folder_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        with atomic_dir(tmp_path / "out"):
            pass


def test_atomic_dir_overwrite_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    dst = tmp_path / "out"
    with atomic_dir(dst) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dst, overwrite=True) as tmp:
            (tmp / "weights").write_text("v2-partial")
            raise RuntimeError("killed mid-write")
    assert (dst / "weights").read_text() == "v1"
    with atomic_dir(dst, overwrite=True) as tmp:
        (tmp / "weights").write_text("v2")
    assert (dst / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (dst.stat().st_mode & 0o777) == (0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_dir_removes_what_a_killed_writer_left(tmp_path, capsys):
    stale = tmp_path / ".out.tmp-99999-deadbeef"
    stale.mkdir()
    (stale / "weights").write_text("partial")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "weights").write_text("done")
    assert not stale.exists() and "left by an interrupted earlier run" in capsys.readouterr().err


def test_the_tree_sweep_removes_every_hidden_temporary_under_a_folder_and_nothing_else(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    (tmp_path / ".results.json.tmp-123-abcdef01").write_text("{")
    (tmp_path / "eval" / ".base.json.tmp-9-0badf00d").write_text("{")
    (tmp_path / "uptrain" / ".run.tmp-5-12345678" / "sub").mkdir(parents=True)
    (tmp_path / "uptrain" / ".run.tmp-5-12345678" / "sub" / ".x.tmp-1-2").write_text("")
    keep = [tmp_path / "results.json", tmp_path / "eval" / "base.json", tmp_path / ".hidden", tmp_path / "a.tmp-1"]
    for path in keep:
        path.write_text("{}")
    clean_stale_temps_under(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(str(p.relative_to(tmp_path)) for p in keep)
    assert capsys.readouterr().err.count("left by an interrupted earlier run") == 3


def _holder(folder: Path, command: str, seconds: float) -> subprocess.Popen:
    """Another process that holds ``folder_lock(folder)`` for ``seconds`` (it prints "locked" once it does)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(SRC)!r})
        from mlkv.files import folder_lock
        with folder_lock({str(folder)!r}, {command!r}):
            print("locked", flush=True)
            time.sleep({seconds})
        """)], stdout=subprocess.PIPE, text=True)


def test_a_second_writer_gets_a_named_error_while_the_first_holds_the_lock(tmp_path):
    holder = _holder(tmp_path / "run", "mlkv train", 60)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUseError, match=rf"is in use by pid {holder.pid} .*\(mlkv train, started"):
            with folder_lock(tmp_path / "run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while True:  # the kernel released the dead holder's lock
        try:
            with folder_lock(tmp_path / "run"):
                break
        except FolderInUseError:
            assert time.time() < deadline
            time.sleep(0.1)


def test_parse_dtype_names_the_flag():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match=r"--dtype \('int3'\) must be one of"):
        parse_dtype("int3", "--dtype")


def test_a_folder_with_a_config_but_no_weights_is_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="config.json but no weights"):
        require_checkpoint(tmp_path, "--model")


def test_a_waiting_taker_blocks_until_the_holder_is_done_then_holds_the_lock(tmp_path, capsys):
    holder = _holder(tmp_path / "cache", "mlkv tokenize", 1.5)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with folder_lock(tmp_path / "cache", wait=True):
            assert time.monotonic() - started > 1.0  # it waited for the holder's block to end
    finally:
        holder.kill()
        holder.wait()
    assert f"waiting for {tmp_path / 'cache'}, in use by pid {holder.pid}" in capsys.readouterr().err
