"""``mlkv export``: the flags (the fields of ``ExportSettings``, SRC and DST positional) and the command."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from mlkv.settings import add_arguments, field_docs, from_args, setting

__all__ = ["ExportSettings", "add_export_arguments", "run_export_command"]


@dataclass
class ExportSettings:
    """What ``mlkv export`` exports and with what (one flag per field, except the positional SRC and DST)."""

    src: str = setting(cli=False)
    """MLKV checkpoint directory (made by mlkv convert or mlkv train)"""
    dst: str = setting(cli=False)
    """output directory (written to a temporary directory, then renamed)"""
    overwrite: bool = setting(False)
    """replace DST if it exists (the old folder is deleted once the new one is in place)"""
    tokenizer: str | None = setting(None)
    """tokenizer directory or tokenizer.json to ship with the model (default: SRC's tokenizer files)"""
    results: list[str] | None = setting(None, metavar="FILE")
    """evaluation results JSON files (written by mlkv eval) for the model card, copied into DST (default: SRC's
    eval_results*.json)"""
    license: str | None = setting(None)
    """the base model's license for the model card, as a Hub license id (e.g. apache-2.0), when SRC's records do
    not state it"""


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``mlkv export SRC DST [--overwrite] [--tokenizer DIR] [--results FILE ...] [--license ID]``."""
    docs = field_docs(ExportSettings)
    parser.add_argument("src", metavar="SRC", help=docs["src"])
    parser.add_argument("dst", metavar="DST", help=docs["dst"])
    return add_arguments(parser, ExportSettings)


def run_export_command(args: argparse.Namespace) -> int:
    """Export an MLKV checkpoint as a folder that loads with transformers alone: AutoModelForCausalLM.from_pretrained
    (DST, trust_remote_code=True), with no mlkv installed. DST holds the weights (safetensors), config.json with an
    auto_map, the modeling code generated from mlkv's own source, the tokenizer, the records of how the model was
    made, its evaluation results, and a model card (README.md) written from them."""
    from mlkv.export.folder import export_checkpoint

    s = from_args(ExportSettings, args)
    dst = export_checkpoint(s.src, s.dst, overwrite=s.overwrite, tokenizer=s.tokenizer, results=s.results,
                            license=s.license)
    files = sorted(p.name for p in dst.iterdir())
    print(f"wrote {dst}: load it with AutoModelForCausalLM.from_pretrained({str(dst)!r}, trust_remote_code=True)")
    print(json.dumps({"dst": str(dst), "files": files, "card": str(Path(dst) / "README.md")}))
    return 0
