"""The model: sharing plans (``sharing``), architecture families (``flavors``), the config and the decoder
(``config``, ``modeling``), the transformers releases they support (``compat``), loading a checkpoint folder
(``loading``), and conversion of Hugging Face checkpoints (``convert``). ``compat``, ``sharing``, ``flavors``,
``config`` and ``modeling`` import only each other of mlkv: ``mlkv export`` ships them with a checkpoint
(``mlkv.export.bundle``).

Names are imported on first use. The model is registered with transformers' Auto classes by the package
(``mlkv/__init__.py``), not by these modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlkv.model.config import PRESETS, MLKVConfig, preset_config
    from mlkv.model.modeling import MLKVForCausalLM, MLKVModel
    from mlkv.model.sharing import PAPER_PRESETS, SharingPlan, resolve_plan

#: Public name -> the module that defines it.
_EXPORTS = {
    "MLKVConfig": "mlkv.model.config",
    "PRESETS": "mlkv.model.config",
    "preset_config": "mlkv.model.config",
    "MLKVForCausalLM": "mlkv.model.modeling",
    "MLKVModel": "mlkv.model.modeling",
    "SharingPlan": "mlkv.model.sharing",
    "resolve_plan": "mlkv.model.sharing",
    "PAPER_PRESETS": "mlkv.model.sharing",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
