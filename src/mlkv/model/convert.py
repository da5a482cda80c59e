"""Convert a trained Hugging Face checkpoint (GPT-NeoX/Pythia, Llama, Qwen2, Mistral) to an MLKV checkpoint.

Steps (the uptraining initialisation of the MLKV paper):

1. Rename every source tensor to mlkv's names (the family's weight map in ``mlkv.model.flavors``). GPT-NeoX's fused
   ``query_key_value`` is laid out per head as [heads, 3, head_dim, hidden] and is split into q/k/v.
2. In-layer pooling: each group of K/V heads that becomes one head is replaced by the group's mean.
3. Cross-layer folding: each producer's K/V becomes a combination of the layers it serves (``init``):
   ``pairwise`` (default: the reference code's running average in layer order: for layers p, p+1, p+2 it gives
   W_p/4 + W_{p+1}/4 + W_{p+2}/2), ``mean`` (uniform mean), ``first`` (the producer's own pooled K/V), or
   ``lsq``: fitted by least squares to the original layers' keys and values on calibration text
   (``mlkv.model.calibrate``).
4. Optionally (``keep_params``) widen every MLP to give back the removed K/V parameters, as the paper did. The new
   neurons get random input weights and *zero* output weights, so the converted model computes exactly the same
   function before training (the paper copied neurons, which changed the output).

Every source key is accounted for: unknown, missing or mis-shaped tensors raise an error that lists them. A
``.gguf`` source (or a known name such as ``smollm2``) is dequantized by transformers' GGUF loader first
(``mlkv.model.gguf``).
"""

from __future__ import annotations

import errno
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file

from mlkv.checkpoints import COMPANION_FILES
from mlkv.diskspace import check_room, disk_full, free_space
from mlkv.files import atomic_dir
from mlkv.model.config import SAVED_ONLY_FIELDS, MLKVConfig
from mlkv.model.config_file import ModelConfigError, check_size_fields, read_model_config
from mlkv.model.flavors import NATIVE_ARCHITECTURE, SUPPORTED_ARCHITECTURES, FusedQKV, for_architecture
from mlkv.model.provenance import CONVERSION_RECORD, base_facts
from mlkv.model.sharing import SharingPlan, resolve_plan

INITS = ("mean", "pairwise", "first", "lsq")
#: The default conversion init. Measured (docs/results/reproduce-h200-run2): after equal LM uptraining, pairwise was
#: best for MLKV-2 (Gutenberg val ppl 122.4 vs mean 126.1, first 128.9; two data orders each) and level with mean for
#: MLKV-6 within the data-order spread (117.8 vs 117.7; first 113.7); first wins MLKV-6 but is worst for MLKV-2.
DEFAULT_INIT = "pairwise"


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message lists the offending keys or fields."""


# ---- reading a source checkpoint ------------------------------------------------------------------------------------
def read_hf_config(src: str | Path) -> dict:
    """``SRC/config.json`` of a supported architecture with its sizes given: a field of the wrong type or a size
    left out is named here, not a ``TypeError`` or ``KeyError`` later."""
    path = Path(src) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} not found: SRC_DIR must be a Hugging Face checkpoint directory")
    try:
        config = read_model_config(path)
        _check_architecture(config)
        check_size_fields(config, path)  # under the names read here, whatever model_type says
    except ModelConfigError as exc:
        raise ConversionError(str(exc)) from None
    return config


def _check_architecture(config: dict) -> None:
    archs = config.get("architectures") or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"architectures ({archs}) is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if archs[0] != NATIVE_ARCHITECTURE:
        _, variant = for_architecture(archs[0])
        problem = variant.reject(config) if variant.reject else None
        if problem:
            raise ConversionError(problem)


def read_hf_state(src: str | Path) -> dict[str, torch.Tensor]:
    """Load weights from safetensors (single or sharded by its index), else ``pytorch_model.bin`` (single or
    sharded) with ``weights_only=True``."""
    src = Path(src)
    for index_name, single, loader in (
            ("model.safetensors.index.json", "model.safetensors", lambda f: load_file(str(f))),
            ("pytorch_model.bin.index.json", "pytorch_model.bin",
             lambda f: torch.load(f, map_location="cpu", weights_only=True))):
        # The index (or the single file) names the weights; other files in the folder (e.g. Mistral's
        # consolidated.safetensors, adapters) are not part of the checkpoint.
        if (src / index_name).is_file():
            files = sorted(set(json.loads((src / index_name).read_text())["weight_map"].values()))
        elif (src / single).is_file():
            files = [single]
        else:
            continue
        state = {}
        for f in files:
            state.update(_read_weights(src / f, loader))
        return state
    raise ConversionError(f"no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found in {src}")


def _read_weights(path: Path, loader) -> dict[str, torch.Tensor]:
    """One weights file through ``loader``; a missing, truncated or corrupt one is a ``ConversionError`` naming it."""
    try:
        return loader(path)
    except Exception as exc:  # noqa: BLE001  (SafetensorError, zip/pickle errors, I/O: the file is unusable)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConversionError(f"{path}: cannot be read ({reason}); the file is missing, truncated or corrupt: "
                              "download or copy the checkpoint again") from exc


def mlkv_config_from_hf(hf: dict) -> MLKVConfig:
    """The MHA (no sharing) ``MLKVConfig`` equivalent to a supported HF config."""
    arch = hf["architectures"][0]
    if arch == NATIVE_ARCHITECTURE:
        config = MLKVConfig(**{k: v for k, v in hf.items() if k not in SAVED_ONLY_FIELDS})
        if config.sharing.consumers:
            raise ConversionError(
                f"kv_source_layers ({config.kv_source_layers}) already shares K/V across layers; convert from the "
                "model before sharing (every layer a producer)"
            )
        return config
    flavor, variant = for_architecture(arch)
    common = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                  intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
                  num_attention_heads=hf["num_attention_heads"],
                  max_position_embeddings=hf.get("max_position_embeddings", 2048),
                  initializer_range=hf.get("initializer_range", 0.02),
                  tie_word_embeddings=hf.get("tie_word_embeddings", False),
                  bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                  pad_token_id=hf.get("pad_token_id"))
    return MLKVConfig(flavor=flavor.name, **{**flavor.hf_fields(hf), **variant.fixed}, **common)


def rename_state(hf: dict, state: dict[str, torch.Tensor], config: MLKVConfig) -> dict[str, torch.Tensor]:
    """Source tensors -> mlkv names for the MHA model; raises listing unknown, missing and mis-shaped keys."""
    arch = hf["architectures"][0]
    if arch == NATIVE_ARCHITECTURE:
        return _check_keys(arch, dict(state), set(state) - set(expected_shapes(config)), config)
    flavor = config.flavor_spec
    state = dict(state)
    for new, old in flavor.aliases.items():
        if new in state and old not in state:
            state[old] = state.pop(new)
    names = {src: dst for src, dst in flavor.weight_names(config.num_hidden_layers).items() if src in state}
    out = {dst: state[src] for src, dst in names.items()}
    used = set(names) | (flavor.ignored_names(config.num_hidden_layers) & set(state))
    if flavor.fused_qkv is not None:
        parts, fused_names = _split_fused_qkv(flavor.fused_qkv, state, config)
        out.update(parts)
        used |= fused_names
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return _check_keys(arch, out, set(state) - used, config)


def _split_fused_qkv(fused: FusedQKV, state: dict[str, torch.Tensor],
                     config: MLKVConfig) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The q/k/v parts (mlkv names) of every fused QKV tensor in ``state``, and the fused names they came from."""
    out, used = {}, set()
    for i in range(config.num_hidden_layers):
        for src, dst in fused.keys.items():
            src = src.format(i=i)
            if src not in state:
                continue
            used.add(src)
            for part, tensor in zip("qkv", fused.split(state[src], config.num_attention_heads, config.head_dim)):
                out[dst.format(i=i, qkv=part)] = tensor
    return out, used


def _check_keys(arch: str, out: dict[str, torch.Tensor], unused: set[str], config: MLKVConfig):
    """Raise listing unknown (unused source), missing and mis-shaped tensors; else return ``out``."""
    if config.tie_word_embeddings:
        unused.discard("lm_head.weight")
        out.pop("lm_head.weight", None)
    unknown = sorted(unused)
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(out))
    misshaped = sorted(f"{k}: {tuple(v.shape)} (expected {expected[k]})" for k, v in out.items()
                       if k in expected and tuple(v.shape) != expected[k])
    if unknown or missing or misshaped:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for name, keys in (("unknown", unknown), ("missing", missing), ("mis-shaped", misshaped)) if keys]
        raise ConversionError(f"checkpoint keys do not match {arch}: " + "; ".join(parts))
    return out


def expected_shapes(config: MLKVConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of an ``MLKVForCausalLM`` built from ``config`` (no allocation)."""
    from mlkv.model.modeling import MLKVForCausalLM

    with torch.device("meta"):
        model = MLKVForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


# ---- applying a sharing plan ----------------------------------------------------------------------------------------
def pool_heads(w: torch.Tensor, src_heads: int, dst_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a K/V weight or bias regrouped from ``src_heads`` to ``dst_heads`` heads.

    Fewer heads: the mean of each group of ``src_heads // dst_heads`` adjacent heads (GQA/MQA pooling). More heads
    (e.g. ``mha`` on a GQA source): each head repeated, which computes exactly the same attention.
    """
    rest = w.shape[1:]
    heads = w.reshape(src_heads, head_dim, *rest)  # (H_src, D, [hidden])
    if dst_heads >= src_heads and dst_heads % src_heads == 0:
        repeated = heads.repeat_interleave(dst_heads // src_heads, dim=0)  # (H_dst, D, [hidden])
        return repeated.reshape(dst_heads * head_dim, *rest)  # (H_dst*D, [hidden])
    if src_heads % dst_heads:
        raise ConversionError(
            f"num_key_value_heads ({dst_heads}) must divide, or be a multiple of, the source model's K/V heads "
            f"({src_heads})"
        )
    grouped = heads.reshape(dst_heads, src_heads // dst_heads, head_dim, *rest)  # (H_kv, group, D, [hidden])
    return grouped.float().mean(dim=1).reshape(dst_heads * head_dim, *rest).to(w.dtype)  # (H_kv*D, [hidden])


def fold_layers(tensors: list[torch.Tensor], init: str) -> torch.Tensor:
    """Combine one producer's tensor with those of the consumers it serves (producer first, layer order)."""
    if init == "first":
        return tensors[0]
    if init == "mean":
        return torch.stack([t.float() for t in tensors]).mean(0).to(tensors[0].dtype)
    if init == "pairwise":  # the reference code: W_p = mean([W_i, W_p]) for each consumer i in turn
        acc = tensors[0].float()
        for t in tensors[1:]:
            acc = (t.float() + acc) / 2
        return acc.to(tensors[0].dtype)
    raise ConversionError(f"init ({init!r}) must be one of {INITS}")


def widened_intermediate(config: MLKVConfig, plan: SharingPlan) -> int:
    """MLP width that gives back the K/V parameters removed by ``plan`` (same for every layer, as in the paper)."""
    h, d = config.hidden_size, config.head_dim
    kv_params = lambda heads: 2 * heads * d * (h + (1 if config.attention_bias else 0))  # noqa: E731
    removed = config.num_hidden_layers * kv_params(config.num_key_value_heads) - plan.num_producers * kv_params(
        plan.num_key_value_heads)
    mats = config.flavor_spec.mlp_matrices
    per_neuron = mats * h + (mats - 1 if config.mlp_bias else 0)  # a column or row of each matrix, input biases
    return config.intermediate_size + round(removed / (config.num_hidden_layers * per_neuron))


def apply_plan(state: dict[str, torch.Tensor], config: MLKVConfig, plan: SharingPlan, init: str = DEFAULT_INIT,
               keep_params: bool = False, seed: int = 0, calibration: list[torch.Tensor] | None = None
               ) -> tuple[dict[str, torch.Tensor], MLKVConfig]:
    """Turn an MHA/GQA state dict (mlkv names, every layer with K/V) into one for ``plan``.

    ``calibration`` (for ``init="lsq"``): every layer's attention input on calibration text, from
    ``calibrate.attention_inputs`` run on the source."""
    if init not in INITS:
        raise ConversionError(f"init ({init!r}) must be one of {INITS}")
    src_heads, d = config.num_key_value_heads, config.head_dim
    new_config = config.with_plan(plan)
    out = {k: v for k, v in state.items() if ".k_proj." not in k and ".v_proj." not in k}
    if init == "lsq":
        if calibration is None:
            raise ConversionError("init 'lsq' needs calibration text (--calibration-data, default: the shared "
                                  "Gutenberg validation books)")
        from mlkv.model.calibrate import least_squares_kv

        out.update(least_squares_kv(state, plan, calibration,
                                    lambda w: pool_heads(w, src_heads, plan.num_key_value_heads, d)))
        if keep_params:
            new_config, out = widen_mlps(out, new_config, widened_intermediate(config, plan), seed)
        return out, new_config
    for p in plan.producers:
        for proj in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                key = f"model.layers.{{i}}.self_attn.{proj}.{kind}"
                if key.format(i=p) not in state:
                    continue
                served = [pool_heads(state[key.format(i=i)], src_heads, plan.num_key_value_heads, d)
                          for i in plan.served_by(p)]
                out[key.format(i=p)] = fold_layers(served, init)
    if keep_params:
        new_config, out = widen_mlps(out, new_config, widened_intermediate(config, plan), seed)
    return out, new_config


def widen_mlps(state: dict[str, torch.Tensor], config: MLKVConfig, width: int, seed: int = 0):
    """Add ``width - intermediate_size`` neurons to every MLP: random inputs, zero outputs (function unchanged)."""
    extra = width - config.intermediate_size
    if extra <= 0:
        return config, state
    gen = torch.Generator().manual_seed(seed)
    state = dict(state)
    for i in range(config.num_hidden_layers):
        for name in ("gate_proj", "up_proj"):
            key = f"model.layers.{i}.mlp.{name}"
            if f"{key}.weight" not in state:
                continue
            w = state[f"{key}.weight"]  # (I, hidden)
            new_rows = torch.randn(extra, w.shape[1], generator=gen) * config.initializer_range
            state[f"{key}.weight"] = torch.cat([w, new_rows.to(w.dtype)])  # (I + extra, hidden)
            if f"{key}.bias" in state:
                b = state[f"{key}.bias"]
                state[f"{key}.bias"] = torch.cat([b, b.new_zeros(extra)])
        down = state[f"model.layers.{i}.mlp.down_proj.weight"]  # (hidden, I)
        state[f"model.layers.{i}.mlp.down_proj.weight"] = torch.cat([down, down.new_zeros(down.shape[0], extra)], 1)
    return config.replace(intermediate_size=width), state


# ---- the whole conversion -------------------------------------------------------------------------------------------
def convert_state(src: str | Path, plan: str | list[int] | SharingPlan = "mha", init: str = DEFAULT_INIT,
                  keep_params: bool = False, seed: int = 0,
                  calibration: torch.Tensor | list[torch.Tensor] | None = None):
    """Read an HF checkpoint directory and return ``(state_dict, MLKVConfig)`` for ``plan``.

    ``calibration`` (``init="lsq"``): token ids (S, T) to run through the source, or the attention inputs that
    ``calibrate.attention_inputs`` already took from it (to convert one source to several plans)."""
    hf = read_hf_config(src)
    try:
        base = mlkv_config_from_hf(hf)
    except StrictDataclassError as exc:  # a field of the wrong type (sizes are checked by read_hf_config)
        raise ConversionError(f"{Path(src) / 'config.json'}: {' '.join(str(exc).split())}") from None
    state = rename_state(hf, read_hf_state(src), base)
    plan = resolve_plan(plan, base.num_hidden_layers, base.num_attention_heads, base.num_key_value_heads)
    if init == "lsq" and isinstance(calibration, torch.Tensor):
        from mlkv.model.calibrate import attention_inputs

        calibration = attention_inputs(build_model(state, base).eval(), calibration)
    return apply_plan(state, base, plan, init, keep_params, seed, calibration)


def build_model(state: dict[str, torch.Tensor], config: MLKVConfig, dtype: torch.dtype | None = None):
    """An ``MLKVForCausalLM`` holding exactly ``state`` (strict: every parameter must be present)."""
    from mlkv.model.modeling import MLKVForCausalLM

    model = MLKVForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"state does not fit the model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype) if dtype is not None else model


@contextmanager
def hf_source(src: str | Path, near: Path):
    """``src`` as a Hugging Face folder: a ``.gguf`` (or ``smollm2``) is read from the cache of dequantized models
    (``mlkv.model.gguf.dequantized``), or with the cache off dequantized into a temporary folder in ``near`` for the
    duration of the block (``convert_checkpoint`` gives its own temporary output folder, so that a killed
    conversion's dequantized copy goes with it)."""
    from mlkv.model.gguf import dequantized, is_gguf, materialize

    if not is_gguf(src):
        yield Path(src)
        return
    cached = dequantized(src)
    if cached is not None:
        yield cached
        return
    near.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=near) as tmp:
        yield materialize(src, Path(tmp) / "hf")


def convert_checkpoint(src: str | Path, dst: str | Path, plan: str = "mha", init: str = DEFAULT_INIT,
                       keep_params: bool = False, seed: int = 0, overwrite: bool = False,
                       calibration: torch.Tensor | None = None) -> Path:
    """Convert ``src`` to an mlkv checkpoint in ``dst``, with the source's tokenizer and generation files.

    The whole conversion runs inside ``mlkv.files.atomic_dir``: it holds ``dst``'s lock (a second writer
    gets a ``FolderInUseError`` at once), removes what a killed conversion left, and writes a temporary folder
    (holding a dequantized GGUF source too when the cache is off) renamed to ``dst`` when complete; with
    ``overwrite`` an existing ``dst`` is set aside and deleted only once the new one is in place."""
    dst = Path(dst)
    if dst.exists() and not overwrite:  # before the conversion's work, not after it
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    with atomic_dir(dst, overwrite=overwrite, command="mlkv convert") as tmp:
        with hf_source(src, tmp) as folder:
            state, config = convert_state(folder, plan, init, keep_params, seed, calibration)
            companions = {name: (folder / name).read_bytes() for name in COMPANION_FILES if (folder / name).is_file()}
            original = mlkv_config_from_hf(read_hf_config(folder))  # the source's own K/V layout
            base = base_facts(folder, str(src))
        check_room(dst, sum(t.numel() * t.element_size() for t in state.values()), "the converted weights")
        model = build_model(state, config)
        try:
            model.save_pretrained(tmp)
        except Exception as exc:
            if disk_full(exc):  # safetensors' own error would read as a corrupt file
                raise OSError(errno.ENOSPC, f"No space left on device ({free_space(dst.parent)})", str(dst)) from exc
            raise
        for name, content in companions.items():
            (tmp / name).write_bytes(content)
        (tmp / CONVERSION_RECORD).write_text(json.dumps(
            {"source": str(src), "plan": plan, "structure": config.sharing.structure, "init": init,
             "keep_params": keep_params, "kv_source_layers": config.kv_source_layers,
             "num_key_value_heads": config.num_key_value_heads, "intermediate_size": config.intermediate_size,
             "kv_bytes_per_token_fp16": config.kv_bytes_per_token("fp16"),
             "parameters": sum(p.numel() for p in model.parameters()),
             "source_structure": original.sharing.structure,
             "source_kv_bytes_per_token_fp16": original.kv_bytes_per_token("fp16"), "base": base}, indent=2))
    return dst


def parameter_count(config: MLKVConfig) -> int:
    """Closed-form parameter count of an ``MLKVForCausalLM`` (tested against ``model.parameters()``); the family's
    terms (parameters per norm channel, matrices per MLP) come from its flavor entry."""
    h, d, L, V, I = config.hidden_size, config.head_dim, config.num_hidden_layers, config.vocab_size, \
        config.intermediate_size
    H, Hkv, P = config.num_attention_heads, config.num_key_value_heads, config.sharing.num_producers
    flavor = config.flavor_spec
    norm = flavor.norm_parameters * h
    qkv_b = 1 if config.attention_bias else 0
    attn = L * (H * d * (h + qkv_b) + H * d * h + (h if config.attention_out_bias else 0))
    attn += P * 2 * Hkv * d * (h + qkv_b)
    mlp_mats = flavor.mlp_matrices
    mlp = L * (mlp_mats * h * I + ((mlp_mats - 1) * I + h if config.mlp_bias else 0))
    embed = V * h * (1 if config.tie_word_embeddings else 2)
    return embed + attn + mlp + L * 2 * norm + norm
