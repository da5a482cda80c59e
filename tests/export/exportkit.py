"""What the export tests share: tiny MLKV checkpoints made the way users make them (a Hugging Face model with the
real Pythia tokenizer, converted to a plan with consumer layers), and an interpreter where mlkv cannot be imported.
Tests that need the shared tokenizer skip without it (``needs_tokenizer``)."""

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mlkv.data.paths import default_data_dir

TOKENIZER = default_data_dir() / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
needs_tokenizer = pytest.mark.skipif(not TOKENIZER.is_file(), reason=f"shared tokenizer not found ({TOKENIZER})")
#: (flavor, plan) of the tiny checkpoints: 4 layers, so each plan has consumer layers.
FLAVORS = {"gpt_neox": "2x1", "llama": "2x2"}


def save_tiny_hf(flavor: str, folder: Path, seed: int = 0) -> Path:
    """A random 4-layer Hugging Face model of ``flavor`` with the Pythia tokenizer; weights large enough that
    greedy generation does not repeat one token."""
    from tiny import hf_llama, hf_neox
    from transformers import PreTrainedTokenizerFast

    model = (hf_neox if flavor == "gpt_neox" else hf_llama)(seed, vocab_size=50304, num_hidden_layers=4)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def python_without_mlkv(code: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that sees this environment's installed packages but not mlkv: ``-S``
    skips site processing, so the editable install's ``.pth`` entry never puts mlkv's source on the path, and
    ``-I`` ignores PYTHONPATH (the tests' ``src``); the site-packages folders are then added by hand. No stdin:
    a prompt (transformers asks before running remote code it was not told to trust) fails instead of waiting."""
    prelude = f"import sys\nsys.path += {site.getsitepackages()!r}\n"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "HF_MODULES_CACHE": str(cwd / "hf_modules"),
           "HF_HOME": str(cwd / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, "-I", "-S", "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


#: Run first in every interpreter of ``without_mlkv``: if mlkv could be imported there, a test would prove nothing.
GUARD = """
try:
    import mlkv
except ModuleNotFoundError:
    pass
else:
    raise SystemExit(f"mlkv is importable here ({mlkv.__file__}): this interpreter does not test what it should")
"""
