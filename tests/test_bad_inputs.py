"""Bad inputs to every command, as a new user makes them: each is refused with exit code 2 and one line naming the
flag or file, before any progress bar or log line, with nothing written (the ``refused`` fixture checks all of
that). A tiny random GPT-NeoX with the real Pythia tokenizer (``tiny_dir``); CPU."""

import errno
import json
import os
import shutil
from collections import namedtuple

import pytest
import torch

import mlkv.files
import mlkv.diskspace
from mlkv.data.paths import default_data_dir

DATA = default_data_dir()
VAL = DATA / "corpus" / "gutenberg" / "val.jsonl.xz"
if not VAL.is_file() or not (DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json").is_file():
    pytest.skip(f"shared data folder not found ({DATA}); set MLKV_DATA", allow_module_level=True)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
NO_CUDA = "--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False); use --device cpu"


def train_args(model, *more) -> list:
    return ["train", "--model", model, "--out", "run", "--steps", 1, "--seq-len", 32, "--data", VAL,
            "--cache-dir", "cache", "--no-progress", *more]


def copy_with(tiny_dir, folder, edit_config=None, tokenizer_text=None):
    """A copy of the tiny checkpoint with its config edited (``edit_config(dict)``) or its tokenizer.json
    replaced."""
    shutil.copytree(tiny_dir, folder)
    if edit_config is not None:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    if tokenizer_text is not None:
        (folder / "tokenizer.json").write_text(tokenizer_text)
    return folder


# ---- --device -------------------------------------------------------------------------------------------------------
@no_cuda
@pytest.mark.parametrize("command", ["train", "eval", "generate", "bench", "reproduce"])
def test_device_cuda_without_cuda_is_named_before_anything_loads(command, tiny_dir, refused):
    argv = {"train": train_args(tiny_dir, "--device", "cuda"),
            "eval": ["eval", tiny_dir, "--tasks", "piqa", "--limit", 1, "--device", "cuda"],
            "generate": ["generate", tiny_dir, "--prompt", "hi", "--device", "cuda"],
            "bench": ["bench", "tiny-neox", "--device", "cuda"],
            "reproduce": ["reproduce", "--smoke", "--out", "run", "--data-dir", DATA, "--plans", "MLKV-2", "--device",
                          "cuda"]}[command]
    refused(argv, NO_CUDA)


def test_a_device_torch_does_not_know_is_named(tiny_dir, refused):
    refused(["generate", tiny_dir, "--prompt", "hi", "--device", "gpu"],
            "--device 'gpu' is not a torch device: use cpu, cuda or cuda:N")


@no_cuda
def test_lm_loss_liger_without_cuda_is_named_before_anything_loads(tiny_dir, refused):
    refused(train_args(tiny_dir, "--lm-loss", "liger"),
            "--lm-loss liger needs CUDA (liger-kernel's Triton kernels); use --lm-loss torch")


def test_lm_loss_liger_with_distillation_is_named(tiny_dir, refused):
    refused(train_args(tiny_dir, "--lm-loss", "liger", "--objective", "distill", "--teacher", tiny_dir),
            "--lm-loss liger computes the lm objective only; distill needs both models' logits (use --lm-loss torch)")


# ---- an output folder that cannot be written ------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["read-only", "permission-denied"])
@pytest.mark.parametrize("command", ["convert", "train", "reproduce"])
def test_an_output_folder_that_cannot_be_written_is_named(command, code, tiny_dir, tmp_path, refused, monkeypatch):
    """The lock file beside the output folder is the first write: on a read-only file system (EROFS), or where
    the user may not write (EACCES; the tests run as root, so it is injected), the folder is named."""
    real_open = os.open

    def open_(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(mlkv.files.os, "open", open_)
    argv = {"convert": ["convert", tiny_dir, "run", "--plan", "1x1"], "train": train_args(tiny_dir),
            "reproduce": ["reproduce", "--smoke", "--out", "run", "--data-dir", DATA, "--plans", "MLKV-2"]}[command]
    refused(argv, f"{tmp_path / 'run'}: cannot write there ({os.strerror(code)}: {tmp_path / '.run.lock'}); "
                  "choose an output folder on a writable file system")


# ---- config.json ----------------------------------------------------------------------------------------------------
def three_layers(config):
    config["num_hidden_layers"] = "three"


def no_hidden_size(config):
    del config["hidden_size"]


@pytest.mark.parametrize("edit, message", [
    (three_layers, "config.json: num_hidden_layers ('three') must be a positive integer"),
    (no_hidden_size, "config.json: no hidden_size: a model config must give its size (vocab_size, hidden_size, "
                     "intermediate_size, num_hidden_layers, num_attention_heads) as positive integers"),
], ids=["wrong-type", "missing"])
@pytest.mark.parametrize("command", ["convert", "train-checkpoint", "train-config", "generate"])
def test_a_config_with_a_wrong_typed_or_missing_size_is_named(command, edit, message, tiny_dir, tmp_path, refused):
    """``train`` from a config that names no hidden_size would have built the class's default, 768 wide."""
    model = copy_with(tiny_dir, tmp_path / "model", edit)
    if command == "train-config":  # a config to pretrain from: the folder holds nothing else
        for path in model.iterdir():
            if path.name != "config.json":
                path.unlink()
    argv = {"convert": ["convert", model, "run", "--plan", "1x1"], "train-checkpoint": train_args(model),
            "train-config": train_args(model, "--tokenizer", tiny_dir),
            "generate": ["generate", model, "--prompt", "hi"]}[command]
    refused(argv, f"{model / message}")


def test_a_field_of_the_wrong_type_beyond_the_sizes_is_named_by_transformers_check(tiny_dir, tmp_path, refused):
    model = copy_with(tiny_dir, tmp_path / "model", lambda config: config.update(layer_norm_eps="small"))
    refused(["convert", model, "run", "--plan", "1x1"],
            f"{model / 'config.json'}: Validation error for field 'layer_norm_eps': TypeError: Field "
            "'layer_norm_eps' expected float, got str (value: 'small')")


# ---- tokenizer, data and prompts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "eval", "train"])
def test_a_corrupt_tokenizer_is_named(command, tiny_dir, tmp_path, refused):
    model = copy_with(tiny_dir, tmp_path / "model", tokenizer_text='{"version": "1.0", "model": ')
    argv = {"generate": ["generate", model, "--prompt", "hi"], "eval": ["eval", model, "--tasks", "piqa"],
            "train": train_args(model)}[command]
    line = refused(argv, f"{model / 'tokenizer.json'}")
    assert "cannot be read as a tokenizer" in line and "copy the tokenizer again" in line


def test_garbage_jsonl_is_named_before_the_model_loads(tiny_dir, tmp_path, refused):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"this is not json\n\x00\x01 more\n")
    refused(train_args(tiny_dir, "--data", garbage), f"{garbage}, line 1: invalid JSON (Expecting value)")


def test_a_missing_task_data_file_is_named_before_the_model_loads(tiny_dir, tmp_path, refused):
    (tmp_path / "empty").mkdir()
    refused(["eval", tiny_dir, "--tasks", "piqa", "--data-dir", "empty"],
            "evaluation data file not found: empty/eval/piqa/valid.jsonl")


def test_prompts_file_given_a_folder_names_the_flag(tiny_dir, tmp_path, refused):
    refused(["generate", tiny_dir, "--prompts-file", tmp_path],
            f"--prompts-file {tmp_path}: is a folder; give a text file with one prompt per line")
    refused(["generate", tiny_dir, "--prompts-file", "nowhere.txt"], "--prompts-file nowhere.txt: no such file")


@pytest.mark.parametrize("flags, message", [
    (["--top-p", 2, "--temperature", 1], "--top-p (2.0) must be in (0, 1]"),
    (["--top-k", 0, "--temperature", 1], "--top-k (0) must be a positive integer"),
    (["--temperature", -1], "--temperature (-1.0) must be a finite number >= 0 (0: greedy)"),
    (["--max-new-tokens", -1], "--max-new-tokens (-1) must be a positive integer"),
    (["--top-p", 0.9], "--top-p only apply to sampling: give --temperature above 0 as well"),
], ids=["top-p", "top-k", "temperature", "max-new-tokens", "top-p-greedy"])
def test_sampling_values_are_checked_against_their_ranges(flags, message, tiny_dir, refused):
    refused(["generate", tiny_dir, "--prompt", "hi", *flags], message)


# ---- a full disk ----------------------------------------------------------------------------------------------------
def little_room(monkeypatch, free: int = 2**20):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(mlkv.diskspace.shutil, "disk_usage", lambda path: usage(free, 0, free))


def test_convert_refuses_at_once_what_the_disk_cannot_hold(tiny_dir, tmp_path, refused, monkeypatch):
    little_room(monkeypatch)
    refused(["convert", tiny_dir, "run", "--plan", "1x1"],
            "run: no room on the disk for the converted weights (at least 12 MiB; the file system of")


def test_train_refuses_at_once_what_the_disk_cannot_hold(tiny_dir, tmp_path, refused, monkeypatch):
    little_room(monkeypatch)
    refused(train_args(tiny_dir), "run: no room on the disk for a checkpoint of the model and its optimizer state "
                                  "and the final model (at least 49 MiB; the file system of")


def test_a_full_disk_while_convert_writes_is_said_to_be_a_full_disk(tiny_dir, tmp_path, monkeypatch, capsys):
    """safetensors' own error for a full disk, which read as "a weights file is corrupt or truncated". (The
    writing has begun, so its progress bar may come first.)"""
    import transformers.modeling_utils

    from mlkv.cli import main

    def full(*args, **kwargs):
        raise Exception("Error while serializing: IoError(No space left on device (os error 28))")  # noqa: TRY002

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    assert main(["convert", str(tiny_dir), str(tmp_path / "run"), "--plan", "1x1"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"mlkv convert: error: no space left on the device writing {tmp_path / 'run'}: free some disk space (or "
        "write elsewhere) and run again")
    assert not list(tmp_path.iterdir())
