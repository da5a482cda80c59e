"""mlkv: Multi-Layer Key-Value sharing for memory-efficient transformer decoding.

``import mlkv`` (and so the import of any of its modules) registers ``MLKVConfig`` / ``MLKVForCausalLM`` with
transformers' ``AutoConfig`` and ``AutoModelForCausalLM``; the model modules themselves register nothing, so that
``mlkv export`` can ship them with a checkpoint, where the config's ``auto_map`` names the classes instead. The
package's layout follows the pipeline:

    model/        sharing plans, config, modeling, architecture flavors, checkpoint conversion
    data/         text sources -> tokens -> packed sequences; the data-folder resolver
    training/     pretraining, uptraining and distillation
    evaluation/   perplexity, zero-shot tasks through lm-evaluation-harness, result files
    inference/    the static-cache CUDA-graph engine, its kernels, and the benchmark
    reproduce/    the paper's experiment end to end
    export/       checkpoints that load with transformers alone, with their model card
    files.py, checkpoints.py, settings.py, tables.py, errors.py: what every stage shares; cli.py: the ``mlkv``
    command
"""

from transformers import AutoConfig, AutoModelForCausalLM

from mlkv.model.config import PRESETS, MLKVConfig, preset_config
from mlkv.model.modeling import MLKVForCausalLM, MLKVModel
from mlkv.model.sharing import PAPER_PRESETS, SharingPlan, resolve_plan

AutoConfig.register("mlkv", MLKVConfig, exist_ok=True)
AutoModelForCausalLM.register(MLKVConfig, MLKVForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["MLKVConfig", "MLKVForCausalLM", "MLKVModel", "MLKVEngine", "SharingPlan", "resolve_plan",
           "preset_config", "PRESETS", "PAPER_PRESETS"]


def __getattr__(name: str):
    if name == "MLKVEngine":  # the engine is imported on first use
        from mlkv.inference.engine import MLKVEngine

        return MLKVEngine
    raise AttributeError(f"module 'mlkv' has no attribute {name!r}")
