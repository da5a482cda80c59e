"""Every path through the model agrees: uncached, dynamic and static caches, chunked prefill, checkpointing, eager."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

from mlkv import MLKVForCausalLM
from mlkv.model.modeling import CACHE_FIELD, sdpa_attention
from mlkv.model.convert import parameter_count
from mlkv.model.sharing import PAPER_PRESETS
from tiny import VOCAB, tiny_model

ATOL = 5e-5  # fp32, 12 layers of large random weights (std 0.2): logits up to ~10
RTOL = 1e-5  # 12 random layers in fp32 reorder sums by ~1e-5 of the logits


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
RANDOM_MAPS = [[0, 0, 2, 0], [0, 1, 1, 0], [0, 0, 0, 3]]


def paper_model(name, flavor="gpt_neox", attn="sdpa"):
    # The paper's 12 x 12 shape, tiny width (head_dim 4).
    return tiny_model(flavor, name, layers=12, heads=12, hidden_size=48, attn=attn)


#: Paper presets in the fast tier (`pytest -m "not slow"`); the others run in the full suite.
FAST_PRESETS = ("MHA-144", "MLKV-6")

def cases():
    for name in PAPER_PRESETS:  # the fast tier keeps MHA-144 and MLKV-6; the random maps cover the rest
        yield pytest.param("gpt_neox", name, id=f"neox-{name}", marks=() if name in FAST_PRESETS else pytest.mark.slow)
    for flavor in ("gpt_neox", "llama"):
        for m in RANDOM_MAPS:
            yield pytest.param(flavor, m, id=f"{flavor}-{m}")
    yield pytest.param("llama", "MLKV-6", id="llama-MLKV-6")


def build(flavor, plan, attn="sdpa"):
    if isinstance(plan, str):
        return paper_model(plan, flavor, attn)
    return tiny_model(flavor, plan, attn=attn)


def decode_logits(model, ids, cache, prefill: int, chunk: int | None = None):
    """Prefill ``prefill`` tokens (in chunks of ``chunk``), then feed the rest one at a time."""
    out = []
    step = chunk or prefill
    for start in range(0, prefill, step):
        out.append(model(ids[:, start:min(start + step, prefill)], past_key_values=cache, use_cache=True).logits)
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("flavor,plan", list(cases()))
@torch.no_grad()
def test_all_paths_agree(flavor, plan):
    model = build(flavor, plan)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    full = model(ids, use_cache=False).logits
    close(decode_logits(model, ids, DynamicCache(config=model.config), 10), full)
    static = StaticCache(config=model.config, max_cache_len=32)
    close(decode_logits(model, ids, static, 10), full)
    close(decode_logits(model, ids, DynamicCache(config=model.config), 24, chunk=7), full)
    eager = build(flavor, plan, attn="eager")
    eager.load_state_dict(model.state_dict())
    close(eager(ids, use_cache=False).logits, full)


@pytest.mark.parametrize("flavor", ["gpt_neox", "llama"])
def test_gradient_checkpointing_same_logits_and_grads(flavor):
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        model = tiny_model(flavor, [0, 0, 2, 2]).train()
        if ckpt:
            model.activation_checkpointing_enable()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = grads
    close(l0, l1)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5), name
    # The producer's K/V weights receive gradient from their consumer too.
    assert g0["model.layers.0.self_attn.k_proj.weight"].abs().sum() > 0


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST_PRESETS else pytest.mark.slow)
                                  for n in PAPER_PRESETS])
@torch.no_grad()
def test_greedy_generate_matches_argmax_loop_and_cache_holds_only_producers(name):
    model = paper_model(name)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    out = model.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    seq = ids
    for _ in range(12):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out.sequences, seq)
    cache = getattr(out, CACHE_FIELD)  # past_key_values before transformers 5.24
    plan = model.config.sharing
    held = [i for i, layer in enumerate(cache.layers) if getattr(layer, "keys", None) is not None
            and layer.keys.numel() > 0]
    assert held == plan.producers
    tokens = cache.get_seq_length()
    nbytes = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                 for i, layer in enumerate(cache.layers) if i in held)
    assert nbytes == plan.kv_bytes_per_token(model.config.head_dim, torch.float32) * tokens


@pytest.mark.parametrize("flavor", ["gpt_neox", "llama"])
@torch.no_grad()
def test_static_cache_generate_matches_dynamic(flavor):
    model = tiny_model(flavor, [0, 0, 2, 2])
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    a = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    b = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(a, b)


@pytest.mark.parametrize("flavor", ["gpt_neox", "llama"])
@torch.no_grad()
def test_left_padded_batch_generation_matches_single(flavor):
    model = tiny_model(flavor, [0, 0, 2, 2])
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (9, 4, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for row, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(batch[row, width:], single[0, len(p):]), row


@pytest.mark.parametrize("flavor", ["gpt_neox", "llama"])
@pytest.mark.parametrize("plan", ["mha", "2x1", [0, 1, 1, 3], "4x2"])
def test_consumers_own_no_kv_and_parameter_count(flavor, plan):
    model = tiny_model(flavor, plan)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        assert hasattr(attn, "k_proj") == hasattr(attn, "v_proj") == model.config.sharing.is_producer(i)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(model.config)


def test_tied_embeddings_and_parameter_count():
    model = tiny_model("llama", "2x1", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == parameter_count(model.config)


@torch.no_grad()
def test_save_and_load_round_trip_is_exact(tmp_path):
    model = tiny_model("llama", [0, 0, 2, 2])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, MLKVForCausalLM)
    assert loaded.config.kv_source_layers == [0, 0, 2, 2]
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, VOCAB, (1, 10))
    assert torch.equal(model(ids).logits, loaded.eval()(ids).logits)


def test_output_hidden_states_and_labels_loss():
    model = tiny_model("gpt_neox", "2x1")
    ids = torch.randint(0, VOCAB, (2, 8))
    out = model(ids, labels=ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-6)


def stored_qkv(model) -> dict:
    """What the decoding engine keeps: ``{producer layer: fused_qkv()}``."""
    return {a.layer_idx: a.fused_qkv() for a in (layer.self_attn for layer in model.model.layers) if a.is_producer}


@torch.no_grad()
def test_qkv_weights_argument_replaces_the_projection_weights():
    """The decoding engine's stored fused Q/K/V weights come in as a forward argument: the model projects its
    producers with them instead of its parameters, which stay as they are."""
    model, other = tiny_model("llama", "2x2", seed=0), tiny_model("llama", "2x2", seed=1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    plain = model(ids).logits
    assert torch.equal(model(ids, qkv_weights=stored_qkv(model)).logits, plain)
    mixed = copy.deepcopy(model)  # model's weights with other's producer Q/K/V projections
    for layer, theirs in zip(mixed.model.layers, other.model.layers):
        if theirs.self_attn.is_producer:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).load_state_dict(getattr(theirs.self_attn, name).state_dict())
    close(model(ids, qkv_weights=stored_qkv(other)).logits, mixed(ids).logits)
    assert not torch.allclose(mixed(ids).logits, plain)
    assert torch.equal(model(ids).logits, plain)


class CacheWithAttention(DynamicCache):
    """A cache that brings its own attention, as the engine's does; records the masks it is given."""

    def __init__(self, config):
        super().__init__(config=config)
        self.masks = []

    def attention(self, q, k, v, mask, scaling, dropout=0.0, training=False):
        self.masks.append(mask)
        return sdpa_attention(q, k, v, mask, scaling)


@torch.no_grad()
def test_a_cache_with_its_own_attention_gets_every_layer_and_the_mask_as_given():
    model = paper_model("MLKV-4")
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.full((2, 1, 7, 7), torch.finfo(torch.float32).min).triu(1)  # (B, 1, T, S) additive causal
    cache = CacheWithAttention(model.config)
    logits = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    assert len(cache.masks) == model.config.num_hidden_layers and all(m is mask for m in cache.masks)
    close(logits, model(ids, use_cache=False).logits)
