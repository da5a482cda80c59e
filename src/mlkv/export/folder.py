"""``export_checkpoint``: an MLKV checkpoint folder -> a folder that loads with transformers alone.

The exported folder holds the weights (safetensors, as mlkv loads them), ``config.json`` with an ``auto_map`` for
``AutoConfig`` and ``AutoModelForCausalLM``, the modeling files (``mlkv.export.bundle``), the tokenizer and its
companion files, the source's records of how the model was made (``mlkv.model.provenance``), its evaluation
results, and the model card written from them (``mlkv.export.card``). The write has ``mlkv convert``'s rules: it
runs in ``mlkv.files.atomic_dir`` (the destination's lock, a temporary folder renamed when complete, an
existing destination replaced only with ``overwrite``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mlkv.checkpoints import TOKENIZER_FILES, companion_files, copy_companions, require_checkpoint
from mlkv.files import atomic_dir
from mlkv.errors import UsageError
from mlkv.export.bundle import AUTO_MAP, write_code
from mlkv.export.card import model_card, read_facts
from mlkv.model.provenance import CONVERSION_RECORD, TRAINING_RECORD, recorded_conversion

__all__ = ["NotAnMLKVCheckpointError", "export_checkpoint", "require_mlkv_checkpoint", "results_files"]


class NotAnMLKVCheckpointError(UsageError):
    """The folder to export is not an MLKV checkpoint; the message says what it is and how to make one."""


def require_mlkv_checkpoint(src: str | os.PathLike) -> Path:
    """``src`` as a Path if it is an MLKV checkpoint (``model_type: mlkv`` and weights), else a named error."""
    path = Path(src).expanduser()
    if not (path / "config.json").is_file():
        raise NotAnMLKVCheckpointError(f"SRC {src}: not an MLKV checkpoint (no config.json in it)")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise NotAnMLKVCheckpointError(f"SRC {src}: config.json is not a model config ({exc})") from exc
    if model_type != "mlkv":
        raise NotAnMLKVCheckpointError(f"SRC {src}: not an MLKV checkpoint (config.json's model_type is "
                                       f"{model_type!r}, not 'mlkv'); make one first: mlkv convert {src} DIR --plan "
                                       "PLAN")
    return require_checkpoint(path, "SRC")


def _export_name(path: Path) -> str:
    """Results files keep an ``eval_results*.json`` name; another (``mlkv reproduce``'s ``eval/<run>.json``)
    becomes ``eval_results_<name>.json``."""
    return path.name if path.name.startswith("eval_results") else f"eval_results_{path.stem}.json"


def results_files(src: Path, given: list[str] | None) -> dict[str, Path]:
    """``{name in the exported folder: file}`` of the evaluation results for the card: ``given`` (``--results``),
    else the ``eval_results*.json`` that ``mlkv eval`` wrote into ``src``."""
    paths = [Path(p).expanduser() for p in given] if given else sorted(src.glob("eval_results*.json"))
    files: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--results {path}: no such file")
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UsageError(f"--results {path}: not JSON ({exc})") from exc
        if not isinstance(content, dict) or not ({"results", "mlkv"} & set(content)):
            raise UsageError(f"--results {path}: not an evaluation results file (written by mlkv eval)")
        if _export_name(path) in files:
            raise UsageError(f"--results {path}: a second results file named {_export_name(path)}; rename one")
        files[_export_name(path)] = path
    return files


def _check_license(src: Path, license: str | None) -> None:
    """``--license`` may state the base's license where the records do not, never contradict them."""
    base = (recorded_conversion(src) or {}).get("base") or {}
    if license and base.get("license") and base["license"] != license:
        raise UsageError(f"--license {license}: the checkpoint records the base model's license as "
                         f"{base['license']!r}; leave --license out")


def _tokenizer_files(src: Path, tokenizer: str | None) -> dict[str, Path]:
    files = companion_files(tokenizer or src)
    if not set(files) & set(TOKENIZER_FILES):
        where = f"--tokenizer {tokenizer}" if tokenizer else f"SRC {src}"
        raise UsageError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])} ...); an exported model "
                         "ships its tokenizer: pass --tokenizer DIR")
    return files


def _write_model(src: Path, folder: Path) -> None:
    """The weights as mlkv loads them (in their stored dtype), as safetensors, and the config with ``auto_map``."""
    from mlkv.model.modeling import MLKVForCausalLM

    model = MLKVForCausalLM.from_pretrained(src, dtype="auto")
    model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP}, indent=2) + "\n",
                                        encoding="utf-8")


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False,
                      tokenizer: str | None = None, results: list[str] | None = None,
                      license: str | None = None) -> Path:
    """Export the MLKV checkpoint ``src`` to ``dst`` (see the module doc); every input is checked before the
    write starts. ``license``: the base model's license for the card, where the records state none."""
    src, dst = require_mlkv_checkpoint(src), Path(dst).expanduser()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    if dst.resolve() == src.resolve():
        raise UsageError(f"DST {dst} is SRC: export to another folder")
    companions, found = _tokenizer_files(src, tokenizer), results_files(src, results)
    _check_license(src, license)
    with atomic_dir(dst, overwrite=overwrite, command="mlkv export") as tmp:
        _write_model(src, tmp)
        copy_companions(companions, tmp)
        write_code(tmp)
        for name in (CONVERSION_RECORD, TRAINING_RECORD):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        for name, path in found.items():
            shutil.copyfile(path, tmp / name)
        (tmp / "README.md").write_text(model_card(read_facts(tmp, dst.name, license)), encoding="utf-8")
    return dst
