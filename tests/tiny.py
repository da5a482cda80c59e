"""Tiny models shared by the tests (hidden 32-64, 2-4 layers, random weights)."""

import torch
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from mlkv import MLKVConfig, MLKVForCausalLM

VOCAB = 96


def tiny_config(flavor="gpt_neox", plan=None, layers=4, heads=4, **kw) -> MLKVConfig:
    fields = dict(flavor=flavor, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=128)
    if flavor == "gpt_neox":
        fields["rope_parameters"] = {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    config = MLKVConfig(**{**fields, **kw})
    return config.with_plan(plan) if plan is not None else config


def tiny_model(flavor="gpt_neox", plan=None, seed=0, attn="sdpa", **kw) -> MLKVForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(flavor, plan, **kw)
    model = MLKVForCausalLM(config)
    model.config._attn_implementation = attn
    # Random, not-small weights so that differences between paths show up.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.generation_config.eos_token_id = None  # generate for exactly max_new_tokens
    return model.eval()


def hf_neox(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
               rotary_pct=0.25, max_position_embeddings=128)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**{**cfg, **kw})).eval()


def hf_llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=128)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def hf_qwen2(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True)
    return Qwen2ForCausalLM(Qwen2Config(**{**cfg, **kw})).eval()


def perturb(model, scale=0.05, seed=1):
    """Make biases and norms non-trivial so their conversion is exercised."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * scale)
    return model


#: A multiple-choice task over a local JSON file (``data``), in lm-eval's YAML format: ``.format(data=path)``.
CAPITALS_TASK = """task: capitals
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: What is the capital of {{{{country}}}}?\\nA:"
doc_to_choice: choices
doc_to_target: answer
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
"""
