"""The cache of dequantized GGUF models (``mlkv.model.gguf.dequantized``): written once per file content and dtype,
waited for while another process writes it, and stepped around when it is off or cannot be written. ``materialize``
is replaced by a recorder here: the real dequantization is covered by ``test_gguf.py``."""

import threading
import time

import pytest

from mlkv.files import atomic_dir, folder_lock
from mlkv.model import gguf


@pytest.fixture
def made(tmp_path, monkeypatch):
    """``(gguf file, list of the folders materialize wrote)`` with the cache in ``tmp_path/cache``."""
    monkeypatch.setenv("MLKV_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_materialize(path, dst, dtype=None, overwrite=False):
        with atomic_dir(dst) as tmp:  # as the real one writes
            calls.append(dst)
            (tmp / "config.json").write_text("{}")
        return dst

    monkeypatch.setattr(gguf, "materialize", fake_materialize)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"first")
    return path, calls


def test_a_second_use_reads_the_cached_folder_without_dequantizing_again(made):
    path, calls = made
    first = gguf.dequantized(path)
    assert gguf.dequantized(path) == first and calls == [first]
    assert first.parent.parent.name == "cache" and "-float32-transformers" in first.name
    assert first.name.endswith(f"-v{gguf.CACHE_FORMAT}")


def test_the_first_use_says_where_it_kept_the_folder_and_later_ones_say_nothing(made, capsys):
    path, _ = made
    entry = gguf.dequantized(path)
    gguf.dequantized(path)
    assert capsys.readouterr().err == (f"mlkv: kept the dequantized model.gguf in {entry} for later runs "
                                       "(MLKV_CACHE=off keeps nothing)\n")


def test_a_changed_file_at_the_same_path_is_dequantized_again(made):
    path, calls = made
    first = gguf.dequantized(path)
    path.write_bytes(b"second")
    assert gguf.dequantized(path) != first and len(calls) == 2


def test_a_caller_waits_for_the_process_writing_the_entry_and_then_reads_it(made):
    path, calls = made
    entry = gguf.cache_entry(path)
    holding = threading.Event()

    def writer():  # another process's dequantized, holding the entry's fill lock
        with folder_lock(entry.with_name(entry.name + ".fill"), "another writer"):
            holding.set()
            time.sleep(0.5)
            entry.mkdir()

    thread = threading.Thread(target=writer)
    thread.start()
    holding.wait()
    assert gguf.dequantized(path) == entry and calls == []
    thread.join()


def test_mlkv_cache_off_keeps_nothing_and_convert_dequantizes_into_a_temporary_folder(made, monkeypatch, tmp_path):
    from mlkv.model.convert import hf_source

    path, calls = made
    monkeypatch.setenv("MLKV_CACHE", "off")
    assert gguf.dequantized(path) is None and calls == []
    with hf_source(path, tmp_path / "near") as folder:
        assert folder.parent.parent == tmp_path / "near" and calls == [folder]
    assert not folder.exists()


def test_an_unwritable_cache_is_said_once_and_stepped_around(made, monkeypatch, tmp_path, capsys):
    path, calls = made
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MLKV_CACHE", str(blocker / "cache"))
    assert gguf.dequantized(path) is None and calls == []
    assert "not caching the dequantized GGUF" in capsys.readouterr().err


def test_an_error_reading_the_file_reaches_the_caller_without_a_cache_note(made, monkeypatch, capsys):
    from mlkv.errors import UsageError

    path, _ = made

    def refuse(path, dst, dtype=None, overwrite=False):
        raise UsageError(f"{path}: a 'gpt2' GGUF; mlkv converts the Llama family")

    monkeypatch.setattr(gguf, "materialize", refuse)
    with pytest.raises(UsageError, match="a 'gpt2' GGUF"):
        gguf.dequantized(path)
    assert capsys.readouterr().err == ""


def test_a_disk_filling_while_the_entry_is_written_is_said_and_stepped_around(made, monkeypatch, capsys):
    import errno

    path, _ = made

    def fill(path, dst, dtype=None, overwrite=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf, "materialize", fill)
    assert gguf.dequantized(path) is None
    assert capsys.readouterr().err.endswith("(the disk is full)\n")
    assert not list(gguf.cache_root().glob("gguf/*-v*"))
