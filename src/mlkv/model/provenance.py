"""What a checkpoint folder records about how it was made: the files, and the facts passed down a chain of them.

* ``mlkv_conversion.json`` (``mlkv convert``): source, plan, init, the source's own K/V bytes per token, and
  ``base``, the original model the chain starts from (``base_facts``).
* ``mlkv_training.json`` (``mlkv train``, beside the final model): objective, tokens, data, ... and the records of
  the model the run started from (``origin_records``), so an uptrained model still knows its conversion.
* ``mlkv_source.json`` (``mlkv.model.gguf.materialize``): the GGUF file a Hugging Face folder was dequantized from,
  and its name, organization and license as the file's metadata states them.

``mlkv export`` writes a model card from these (``mlkv.export.card``): what is not recorded is said to be so.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from mlkv.checkpoints import has_weights

CONVERSION_RECORD = "mlkv_conversion.json"
TRAINING_RECORD = "mlkv_training.json"
SOURCE_RECORD = "mlkv_source.json"
#: The records a model folder may hold (they travel with its weights: ``mlkv.training.outdir.is_model_file``).
RECORDS = (CONVERSION_RECORD, TRAINING_RECORD, SOURCE_RECORD)


def read_record(folder: str | os.PathLike, name: str, exact: bool = False) -> dict[str, Any] | None:
    """The record ``name`` in ``folder``, or None. ``exact``: numbers with a fraction stay the strings the file
    has, so a model card shows them exactly as recorded."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"), parse_float=str if exact else float)


def recorded_conversion(folder: str | os.PathLike, exact: bool = False) -> dict[str, Any] | None:
    """The conversion ``folder``'s model descends from: the one its training record carries (an uptrained model),
    else its own conversion record, else None."""
    training = read_record(folder, TRAINING_RECORD, exact)
    return (training or {}).get("conversion") or read_record(folder, CONVERSION_RECORD, exact)


def readme_license(folder: str | os.PathLike) -> str | None:
    """The ``license:`` of a Hugging Face folder's model card (``README.md``'s front matter), or None."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return None
    match = re.match(r"---\n(.*?)\n---", path.read_text(encoding="utf-8", errors="replace"), re.DOTALL)
    found = re.search(r"^license:\s*['\"]?([^'\"\s#]+)", match[1], re.MULTILINE) if match else None
    return found[1] if found else None


def base_facts(folder: str | os.PathLike, source: str) -> dict[str, Any]:
    """The original model behind a conversion of ``folder`` (given on the command line as ``source``): inherited
    from ``folder``'s own records when it was made by mlkv from one, else ``source`` with what ``folder`` states of
    its name and license, and how mlkv trained it if it did (a base pretrained here)."""
    inherited = (recorded_conversion(folder) or {}).get("base")
    if inherited:
        return inherited
    facts: dict[str, Any] = {"source": str(source)}
    gguf = read_record(folder, SOURCE_RECORD) or {}
    facts.update({key: gguf[key] for key in ("name", "organization", "license") if gguf.get(key)})
    if "license" not in facts and (license := readme_license(folder)):
        facts["license"] = license
    training = read_record(folder, TRAINING_RECORD)
    if training:
        facts["training"] = {k: v for k, v in training.items() if k not in ("conversion", "earlier_training")}
    return facts


def origin_records(model: str) -> dict[str, Any]:
    """For a training record: whether the run started from a checkpoint (``model``) or a random init, and that
    checkpoint's conversion and earlier training, as it recorded them."""
    folder = Path(model).expanduser()
    if not (folder.is_dir() and has_weights(folder)):
        return {"start": "random"}
    conversion = recorded_conversion(folder)
    earlier = read_record(folder, TRAINING_RECORD)
    if earlier:
        earlier = {k: v for k, v in earlier.items() if k not in ("conversion", "earlier_training")}
    return {"start": "checkpoint", "conversion": conversion, "earlier_training": earlier}
