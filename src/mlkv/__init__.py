"""mlkv: Multi-Layer Key-Value sharing for memory-efficient transformer decoding.

``import mlkv`` registers ``MLKVConfig`` / ``MLKVForCausalLM`` with transformers' ``AutoConfig`` and
``AutoModelForCausalLM``.
"""

from mlkv.model.config import PRESETS, MLKVConfig, preset_config
from mlkv.model.modeling import MLKVForCausalLM, MLKVModel
from mlkv.model.sharing import PAPER_PRESETS, SharingPlan, resolve_plan

__version__ = "0.1.0"
__all__ = ["MLKVConfig", "MLKVForCausalLM", "MLKVModel", "SharingPlan", "resolve_plan", "preset_config", "PRESETS",
           "PAPER_PRESETS"]
