"""Reading a model's ``config.json`` before anything is built from it: its size fields named when missing or not
positive integers, every field's type checked by its own config class, so a bad file is one named error and never a
model of the class's default size (768 wide for GPT-NeoX). Kept apart from ``config`` (the ``MLKVConfig`` class),
which ``mlkv export`` ships with a checkpoint and so imports nothing of mlkv but the model's own modules."""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError

from mlkv.errors import UsageError

__all__ = ["SIZE_FIELDS", "OPTIONAL_SIZE_FIELDS", "ModelConfigError", "read_model_config", "check_size_fields"]

#: The fields that give a model its size: a ``config.json`` must name each that its config class has, as a positive
#: integer; left out, transformers would quietly build the class's default size (768 wide for GPT-NeoX).
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
#: Size fields that may be left out (derived or defaulted) but, where given, must be positive integers.
OPTIONAL_SIZE_FIELDS = ("num_key_value_heads", "head_dim", "max_position_embeddings")


class ModelConfigError(UsageError):
    """A model ``config.json`` that cannot be read, names no size or gives one that is not a positive integer."""


def read_model_config(path: str | os.PathLike) -> dict:
    """The JSON object of a model's ``config.json``, its size fields checked (``check_size_fields``) under the
    names its config class uses (GPT-2's ``n_embd`` for ``hidden_size``), then every field's type by the class
    itself; a ``model_type`` transformers does not know is left for transformers to name."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"{path}: cannot be read ({exc}); download or copy the checkpoint again") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: not a model config (a JSON {type(config).__name__}, not an object)")
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        cls = CONFIG_MAPPING[model_type]
        declared = {name for klass in cls.__mro__ for name in getattr(klass, "__annotations__", {})}
        check_size_fields(config, path, getattr(cls, "attribute_map", {}), declared)
        try:
            cls.from_dict(config)  # the class's own checks of every field's type
        except (StrictDataclassError, TypeError) as exc:
            raise ModelConfigError(f"{path}: {' '.join(str(exc).split())}") from None
    return config


def check_size_fields(config: dict, path: str | os.PathLike, aliases: dict[str, str] | None = None,
                      declared: set[str] | None = None) -> None:
    """Raise ``ModelConfigError`` naming ``path`` and the field for a size field (``SIZE_FIELDS``) that ``config``
    leaves out, or one (``OPTIONAL_SIZE_FIELDS`` too) that is not a positive integer. ``aliases``: the config
    class's own name for a field; ``declared``: the fields the class has (others are not checked)."""
    for name in SIZE_FIELDS + OPTIONAL_SIZE_FIELDS:
        key = (aliases or {}).get(name, name)
        if declared is not None and key not in declared:
            continue
        value = config.get(key)
        if value is None and name in SIZE_FIELDS:
            raise ModelConfigError(f"{path}: no {key}: a model config must give its size ({', '.join(SIZE_FIELDS)}) "
                                   "as positive integers")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelConfigError(f"{path}: {key} ({value!r}) must be a positive integer")

