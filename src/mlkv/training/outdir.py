"""A run's output folder (``--out``): what may already be in it, the temporary folders written there, and the
final model's atomic save.

* The run holds ``mlkv.files.folder_lock(out)`` from start to end (``loop.train``): a second writer of the
  same folder gets a ``FolderInUseError`` naming the holder.
* ``prepare_out_folder``: a folder that holds another model or other files is refused unless ``--overwrite``; one
  with a checkpoint is refused unless ``--resume`` (or ``--overwrite``, which removes the earlier run's checkpoint
  and metrics once the new run's inputs are checked, ``remove_earlier_run``; an earlier model stays until this
  run's is saved). Temporaries a killed run left are removed with a message.
* ``staging``: a temporary folder that is removed when the block fails; a full disk is reported as such.
* ``training_record``: ``mlkv_training.json``, written with the final model (``mlkv.model.provenance``).
* ``save_final_model``: the model is written to ``out/.model.tmp-*``, then moved in with ``config.json`` last, after
  the files of an earlier model were moved aside (``config.json`` first) into ``out/.model.old.tmp-*``, deleted at
  the end. ``config.json`` is what makes a folder a checkpoint (``mlkv.checkpoints.require_checkpoint``), so a kill
  at any point leaves the old model, no model, or the new one, never ``config.json`` beside other weights.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mlkv.checkpoints import COMPANION_FILES
from mlkv.diskspace import disk_full, free_space
from mlkv.files import clean_stale_temps, temp_path
from mlkv.model.provenance import RECORDS, origin_records

if TYPE_CHECKING:
    from mlkv.training.config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT", "RUN_ENTRIES", "MODEL_STAGE", "prepare_out_folder", "remove_earlier_run", "has_checkpoint",
           "is_model_file", "staging", "save_final_model", "training_record"]

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"
#: What a training run writes into its folder besides the final model.
RUN_ENTRIES = ("metrics.jsonl", "tensorboard", CHECKPOINT, CHECKPOINT + ".old", CHECKPOINT + ".tmp")
#: The final model is staged in ``out/.model.tmp-*`` (an earlier one set aside in ``out/.model.old.tmp-*``).
MODEL_STAGE = "model"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def is_model_file(name: str) -> bool:
    """A file of a saved model: its config, weights (and their index), tokenizer and generation files, and the
    records of how it was made (``mlkv.model.provenance``)."""
    return (name == "config.json" or name in COMPANION_FILES or name in RECORDS or name.endswith(WEIGHT_SUFFIXES)
            or name.endswith((".safetensors.index.json", ".bin.index.json")))


def has_checkpoint(out: Path) -> bool:
    """A checkpoint (complete: its trainer state written last) in ``out/checkpoint`` or ``out/checkpoint.old``."""
    return any((out / name / STATE_FILE).is_file() for name in (CHECKPOINT, CHECKPOINT + ".old"))


def clean_out_folder(out: Path) -> None:
    """Remove the temporaries of a killed run: a staged or set-aside model, a half-written checkpoint. Call it only
    while holding ``folder_lock(out)``."""
    clean_stale_temps(out / MODEL_STAGE)
    partial = out / (CHECKPOINT + ".tmp")
    if partial.exists():
        shutil.rmtree(partial, ignore_errors=True)
        print(f"mlkv: removed {partial}, left by an interrupted earlier run", file=sys.stderr)


def _some(names: list[str], most: int = 4) -> str:
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")


def prepare_out_folder(out: Path, resuming: bool, overwrite: bool) -> list[Path]:
    """Check what ``out`` holds before a run writes there (rank 0, holding the folder's lock); see the module doc.
    Returns what ``--overwrite`` will remove (``remove_earlier_run``), which the caller does only once the run's
    inputs are checked, so that a refused run deletes nothing.

    ``resuming``: a checkpoint of this run is being resumed, so everything in the folder is this run's."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return []
    clean_out_folder(out)
    if resuming:
        return []
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if has_checkpoint(out) and not overwrite:
        raise FileExistsError(f"{out} already holds a checkpoint: pass --resume to continue it, --overwrite to "
                              "start again, or choose another --out")
    others = [name for name in entries if name not in RUN_ENTRIES]
    if others and not overwrite:
        model = [name for name in others if is_model_file(name)]
        what = (f"a model ({_some(model)})" if "config.json" in model
                else f"files that are not a training run's ({_some(others)})")
        raise FileExistsError(f"{out} already holds {what}: pass --overwrite to replace it with this run's model "
                              "(the old files stay until the new model is saved), or choose another --out")
    return [out / name for name in RUN_ENTRIES if (out / name).exists()] if overwrite else []


def remove_earlier_run(earlier: list[Path]) -> None:
    """``--overwrite``: remove the earlier run's checkpoints and metrics (``prepare_out_folder``'s list)."""
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if earlier:
        logger.warning("--overwrite: removed the earlier run's %s from %s", ", ".join(p.name for p in earlier),
                       earlier[0].parent)


# ---- writing --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def staging(folder: Path, destination: Path) -> Iterator[Path]:
    """An empty temporary ``folder`` for the block; removed if the block fails. A full disk becomes
    ``OSError(ENOSPC)`` naming ``destination`` (what was being written), its file system and the space left."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    except BaseException as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, Exception) and disk_full(exc):
            raise OSError(errno.ENOSPC, f"No space left on device ({free_space(folder.parent)})",
                          str(destination)) from exc
        raise


def fsync_files(folder: Path) -> None:
    """Flush every file of ``folder`` to the disk (before it is renamed into place)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def training_record(cfg: TrainConfig, steps: int, tokens: int, validation: dict) -> dict:
    """``mlkv_training.json``, saved with the final model: how it was trained (as ``cfg`` says, with the ``steps``
    and ``tokens`` done and the last ``validation``), and the records of the model it started from."""
    record = {"objective": cfg.objective, "tokens": tokens, "steps": steps, "data": cfg.data,
              "val_data": cfg.val_data, "seq_len": cfg.seq_len, "lr": cfg.lr, "seed": cfg.seed, "model": cfg.model,
              "plan": cfg.plan, "validation": validation or None}
    if cfg.objective == "distill":
        record.update(teacher=cfg.teacher, distill_alpha=cfg.distill_alpha, distill_hidden=cfg.distill_hidden,
                      distill_temperature=cfg.distill_temperature)
    return {**record, **origin_records(cfg.model)}


def save_final_model(out: Path, write: Callable[[Path], None]) -> None:
    """The final model in ``out``: ``write(folder)`` fills a temporary folder, then its files replace the earlier
    model's (see the module doc for the order that keeps a kill harmless)."""
    stage = temp_path(out / MODEL_STAGE)
    with staging(stage, out):
        write(stage)
        fsync_files(stage)
    aside = None
    earlier = sorted((p.name for p in out.iterdir() if p.is_file() and is_model_file(p.name)),
                     key=lambda name: name != "config.json")  # config.json first: no model from here on
    if earlier:
        aside = temp_path(out / (MODEL_STAGE + ".old"))
        aside.mkdir()
        for name in earlier:
            os.replace(out / name, aside / name)
    for name in sorted((p.name for p in stage.iterdir()), key=lambda name: name == "config.json"):  # it last
        os.replace(stage / name, out / name)
    stage.rmdir()
    if aside is not None:
        shutil.rmtree(aside)
