"""The decoding engine: greedy output equals transformers' generate(), producer-only cache, stops, sampling."""

import pytest
import torch
import torch.nn.functional as F

import mlkv.inference.attention
from mlkv.inference.attention import engine_attention
from mlkv.inference.cache import ProducerKVCache
from mlkv.inference.engine import MLKVEngine, generate
from mlkv.model.modeling import sdpa_attention
from mlkv.model.sharing import PAPER_PRESETS, dtype_bytes
from tiny import VOCAB, tiny_model

NEW = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def paper_model(name, flavor="gpt_neox"):
    return tiny_model(flavor, name, layers=12, heads=12, hidden_size=48)


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def hf_greedy(model, prompt, new=NEW):
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


def assert_matches_hf(model, engine, lengths, new=NEW, seed=0):
    prompts = prompts_of(lengths, seed)
    out = engine.generate(prompts, new, stop_tokens=[])
    assert [len(t) for t in out.tokens] == [new] * len(prompts)
    for prompt, tokens in zip(prompts, out.tokens):
        assert tokens == hf_greedy(model, prompt, new)
    return out


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_greedy_equals_hf_generate_paper_presets(name):
    model = paper_model(name)
    # bucket=8: the decode steps cross several attention-length buckets; prompts of different lengths in one batch.
    assert_matches_hf(model, MLKVEngine(model, bucket=8), [5, 11, 8])


@pytest.mark.parametrize("plan", [[0, 0, 2, 2], "2x2", "mqa"], ids=str)
def test_greedy_equals_hf_generate_llama(plan):
    model = tiny_model("llama", plan)
    engine = MLKVEngine(model, bucket=4)
    assert_matches_hf(model, engine, [7, 3, 12, 9])
    # Same-length prompts: the prefill takes the unmasked causal path.
    assert_matches_hf(model, engine, [6, 6, 6, 6], seed=1)


def test_engine_reuses_buffers_and_leaves_the_config_alone():
    model = paper_model("MLKV-4")
    engine = MLKVEngine(model, bucket=8)
    assert_matches_hf(model, engine, [4, 9])
    storage = engine.cache.storage
    assert_matches_hf(model, engine, [6, 2], seed=3)  # same batch, shorter call: the cache stays
    assert engine.cache.storage is storage
    assert model.config._attn_implementation == "sdpa"  # the engine's attention comes with its cache


def test_fused_qkv_weights_follow_the_parameters():
    """The engine's stored fused Q/K/V weights are refreshed by each generate() (the model only sees them as the
    ``qkv_weights`` argument of the engine's forward calls)."""
    model = paper_model("MLKV-12")
    engine = MLKVEngine(model, bucket=8)
    producers = model.config.sharing.producers
    assert sorted(engine._fused) == producers
    fused = sum(w.numel() + (0 if b is None else b.numel()) for w, b in engine._fused.values()) * 4
    assert fused == MLKVEngine.fused_bytes(model.config, torch.float32)
    assert_matches_hf(model, engine, [5, 9])
    storage = engine._fused[producers[0]][0]
    with torch.no_grad():  # "training" changed the weights after the engine was built
        for layer in model.model.layers:
            if layer.self_attn.is_producer:
                layer.self_attn.k_proj.weight.mul_(-1.5)
                layer.self_attn.q_proj.bias.add_(0.3)
    assert_matches_hf(model, engine, [5, 9], seed=1)
    assert engine._fused[producers[0]][0] is storage  # refreshed in place: captured graphs stay valid


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_static_cache_holds_only_producers(name):
    model = paper_model(name)
    plan, cfg = model.config.sharing, model.config
    batch, max_len = 3, 40
    engine = MLKVEngine(model, max_batch_size=batch, max_len=max_len)
    expected = plan.kv_bytes_per_token(cfg.head_dim, torch.float32) * batch * max_len
    assert engine.cache_bytes == expected
    assert engine.cache.storage.shape == (2, plan.num_producers, batch, cfg.num_key_value_heads, max_len,
                                          cfg.head_dim)
    assert sorted(engine.cache._kv) == plan.producers  # consumers own no cache slot
    assert engine.cache_bytes == 2 * plan.total_kv_heads * cfg.head_dim * dtype_bytes("fp32") * batch * max_len
    assert MLKVEngine.buffer_bytes(cfg, batch, max_len, torch.float32) >= expected


def test_preallocated_engine_fewer_prompts_and_limits():
    model = paper_model("MLKV-12")
    engine = MLKVEngine(model, max_batch_size=4, max_len=30)
    assert_matches_hf(model, engine, [5, 9])  # 2 prompts in a batch of 4: dummy rows fill the rest
    with pytest.raises(ValueError, match="max_batch_size=4"):
        engine.generate(prompts_of([3] * 5), 4)
    with pytest.raises(ValueError, match="max_len=30"):
        engine.generate(prompts_of([25]), 10)


def test_stop_tokens_end_rows_early():
    model = paper_model("MLKV-2")
    prompts = prompts_of([6, 10, 4], seed=5)
    free = MLKVEngine(model).generate(prompts, 12, stop_tokens=[]).tokens
    stop0 = free[0][4]
    cut0 = free[0].index(stop0) + 1
    stop2 = free[2][2]
    cut2 = free[2].index(stop2) + 1
    engine = MLKVEngine(model, stop_check_interval=1)
    out = engine.generate(prompts, 12, stop_tokens=[[stop0], None, [stop2, VOCAB + 5]])
    assert out.tokens[0] == free[0][:cut0]
    assert out.tokens[1] == free[1]
    assert out.tokens[2] == free[2][:cut2]
    assert out.finished == [True, False, True]
    pad = engine.pad_token_id
    assert out.output[0, cut0:].tolist() == [pad] * (12 - cut0)
    # One stop set for all rows; when every row has stopped, the call ends before max_new_tokens.
    firsts = {row[0] for row in free}
    out = engine.generate(prompts, 12, stop_tokens=sorted(firsts))
    assert out.tokens == [row[:1] for row in free]
    assert out.steps < 11
    # None means the model's eos token, as in transformers.
    model.generation_config.eos_token_id = stop0
    assert MLKVEngine(model).generate(prompts[:1], 12).tokens[0] == free[0][:cut0]


def test_sampling_reproducible_and_top_k_one_is_greedy():
    model = paper_model("GQA-48")
    prompts = prompts_of([5, 9, 3], seed=2)
    engine = MLKVEngine(model, bucket=8)
    greedy = engine.generate(prompts, NEW, stop_tokens=[]).tokens
    kw = dict(do_sample=True, temperature=1.5, stop_tokens=[])
    a = engine.generate(prompts, NEW, seed=1, **kw).tokens
    b = engine.generate(prompts, NEW, seed=1, **kw).tokens
    c = engine.generate(prompts, NEW, seed=2, **kw).tokens
    assert a == b
    assert a != c and a != greedy
    assert engine.generate(prompts, NEW, seed=3, top_k=1, **kw).tokens == greedy
    assert engine.generate(prompts, NEW, seed=3, top_p=1e-6, **kw).tokens == greedy
    assert generate(model, prompts, NEW, temperature=1.5, seed=1, stop_tokens=[]) == a  # the one-shot helper


@torch.no_grad()
def test_top_k_and_top_p_keep_only_allowed_tokens():
    model = paper_model("MLKV-6")
    prompt = prompts_of([6], seed=4)[0]
    engine = MLKVEngine(model)
    for kw, allowed in ((dict(top_k=3), "k"), (dict(top_p=0.5), "p")):
        for seed in range(3):
            tokens = engine.generate([prompt], 8, do_sample=True, temperature=2.0, seed=seed, stop_tokens=[],
                                     **kw).tokens[0]
            seq = torch.tensor([prompt + tokens])
            logits = model(seq).logits[0, len(prompt) - 1:-1].float() / 2.0  # the distributions sampled from
            for step, tok in enumerate(tokens):
                if allowed == "k":
                    assert tok in logits[step].topk(3).indices.tolist()
                else:
                    p = logits[step].softmax(-1)
                    above = p[p > p[tok]].sum()  # mass ranked above the drawn token
                    assert above <= 0.5 + 1e-6


def test_attention_split_over_batch(monkeypatch):
    # Batches above the CUDA grid limit run the attention kernel in slices; same tokens.
    model = paper_model("MLKV-48")
    monkeypatch.setattr(mlkv.inference.attention, "ATTN_BATCH_CHUNK", 2)
    assert_matches_hf(model, MLKVEngine(model, bucket=8), [5, 11, 8, 2, 7])


def test_engine_attention_equals_model_sdpa():
    g = torch.Generator().manual_seed(0)
    for heads, kv_heads, T in ((8, 2, 1), (8, 8, 1), (8, 1, 5), (4, 2, 5)):
        q = torch.randn(3, heads, T, 16, generator=g)
        k, v = (torch.randn(3, kv_heads, 11, 16, generator=g) for _ in range(2))
        mask = torch.rand(3, 1, T, 11, generator=g) > 0.3
        mask[..., -1] = True
        add = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
        ref = sdpa_attention(q, k, v, mask, 0.25)
        assert torch.allclose(engine_attention(q, k, v, add, 0.25), ref, atol=1e-5)
        assert torch.allclose(engine_attention(q, k, v, mask, 0.25), ref, atol=1e-5)
        if T > 1:
            causal = F.scaled_dot_product_attention(q, k[:, :, :T], v[:, :, :T], is_causal=True,
                                                    enable_gqa=True).transpose(1, 2)
            assert torch.allclose(engine_attention(q, k[:, :, :T], v[:, :, :T], None, 0.25), causal, atol=1e-5)


def test_full_context_step_runs_one_step_and_never_grows_the_cache():
    """The public step-timing API: each call runs exactly one greedy decode step from the last cache column."""
    model = paper_model("MLKV-4")
    engine = MLKVEngine(model, bucket=None)
    run_one_step = engine.full_context_step(3, 20)
    assert (engine.batch_size, engine.max_len, engine.captured_graphs) == (3, 20, 0)  # no graphs on CPU
    storage = engine.cache.storage
    for _ in range(3):
        run_one_step()
        assert int(engine.col) == 20 and int(engine.step) == 1  # one step, from column 19
        assert torch.equal(engine.out[:, 0], engine.tok[:, 0])  # its greedy token, fed to the next step
    assert engine.cache.storage is storage
    assert model.config._attn_implementation == "sdpa"  # the engine's attention comes with its cache


def test_argument_errors():
    model = paper_model("MLKV-1")
    engine = MLKVEngine(model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1, 2]], 0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([[1] * 120], 20)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], 4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], 4)
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[VOCAB]], 4)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[1]], 4, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[1]], 4, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="per-row stop_tokens"):
        engine.generate([[1], [2]], 4, stop_tokens=[[1]])
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        MLKVEngine(model, cuda_graphs=True)


# ---- on a CUDA device (pytest -m gpu): graphs, compile, the real allocator ------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_cuda_graphs_greedy_equals_hf_generate(name):
    model = paper_model(name).cuda()
    engine = MLKVEngine(model, bucket=8)
    assert engine.cuda_graphs
    assert_matches_hf(model, engine, [5, 11, 8])
    assert engine.captured_graphs >= 2  # one graph per attention-length bucket, replayed
    assert_matches_hf(model, engine, [9, 3, 4], seed=1)  # replays of the same graphs, other prompts


@pytest.mark.gpu
def test_cuda_graphs_llama_stops_and_sampling():
    model = tiny_model("llama", "2x2").cuda()
    engine = MLKVEngine(model, bucket=4, stop_check_interval=1)
    assert_matches_hf(model, engine, [7, 3, 12, 9])
    prompts = prompts_of([6, 10, 4], seed=5)
    free = engine.generate(prompts, 12, stop_tokens=[]).tokens
    stop = free[1][3]
    out = engine.generate(prompts, 12, stop_tokens=[None, [stop], None])
    assert out.tokens[1] == free[1][:free[1].index(stop) + 1] and out.tokens[0] == free[0]
    kw = dict(do_sample=True, temperature=1.5, stop_tokens=[])
    a = engine.generate(prompts, 12, seed=1, **kw).tokens
    assert engine.generate(prompts, 12, seed=1, **kw).tokens == a
    assert engine.generate(prompts, 12, seed=2, **kw).tokens != a
    assert engine.generate(prompts, 12, seed=1, top_k=1, **kw).tokens == free
    assert engine.generate(prompts, 12, seed=1, top_k=5, top_p=0.9, **kw).tokens != free


@pytest.mark.gpu
def test_cuda_compiled_engine_equals_eager():
    model = paper_model("MLKV-4").cuda()
    prompts = prompts_of([5, 11, 8])
    eager = MLKVEngine(model, cuda_graphs=False).generate(prompts, NEW, stop_tokens=[]).tokens
    assert MLKVEngine(model, compile=True).generate(prompts, NEW, stop_tokens=[]).tokens == eager


@pytest.mark.gpu
def test_cuda_full_context_step_replays_one_captured_graph():
    model = paper_model("MLKV-6").cuda()
    engine = MLKVEngine(model, bucket=8)
    run_one_step = engine.full_context_step(4, 40)
    assert engine.captured_graphs == 1  # the full-context greedy step, captured once
    for _ in range(3):
        run_one_step()
    torch.cuda.synchronize()
    assert int(engine.col) == 40 and int(engine.step) == 1 and engine.captured_graphs == 1


def test_engine_built_under_inference_mode_generates_outside_it():
    """The stored fused weights are ordinary tensors: refreshing them in a later generate() works."""
    model = paper_model("MLKV-6")
    with torch.inference_mode():
        engine = MLKVEngine(model, bucket=8)
    assert_matches_hf(model, engine, [4, 7])
    model.to(torch.float64)
    with pytest.raises(RuntimeError, match="changed dtype/device since this engine was built"):
        engine.generate([[1, 2, 3]], 2)


@pytest.fixture
def reference_kernel(monkeypatch) -> list:
    """The kernel's fp32 reference in place of the Triton kernel (which needs a GPU), said to support every model;
    returns the list of its calls' ``(start, end)``."""
    from mlkv.inference import kernels

    calls = []

    def reference(q, k, v, start, end, scale):
        calls.append((start.tolist(), end.tolist()))
        return kernels.decode_attention_reference(q, k, v, start, end, scale).to(q.dtype)

    monkeypatch.setattr(kernels, "supported", lambda q, k, v=None: True)
    monkeypatch.setattr(kernels, "decode_attention", reference)
    return calls


@pytest.mark.parametrize("name", ["MHA-144", "MLKV-12", "MLKV-1"])
@pytest.mark.parametrize("lengths", [[5, 9, 1], [1]], ids=["left-padded", "one-token-prompt"])
def test_decode_kernel_path_gives_hf_greedy_tokens(reference_kernel, name, lengths):
    """The engine's plumbing for the decode kernel (per-row [start, end) columns instead of the mask), with the
    kernel's fp32 reference standing in for the Triton kernel on CPU."""
    calls = reference_kernel
    model = paper_model(name)
    engine = MLKVEngine(model, decode_attention="triton")
    assert engine.decode_attention == "triton"
    assert_matches_hf(model, engine, lengths)
    P = max(lengths)
    assert calls and calls[-1][0] == [P - n for n in lengths] and calls[-1][1] == [P + NEW - 1] * len(lengths)


def test_decode_attention_setting_is_checked():
    model = paper_model("MLKV-6")
    assert MLKVEngine(model, decode_attention="auto").decode_attention == "sdpa"  # CPU: no kernel
    with pytest.raises(ValueError, match="decode_attention='triton' needs a CUDA model"):
        MLKVEngine(model, decode_attention="triton")
    with pytest.raises(ValueError, match=r"decode_attention \('flash'\) must be one of sdpa, triton, auto"):
        MLKVEngine(model, decode_attention="flash")
    with pytest.raises(ValueError, match=r"decode_attention \('auto'\) must be one of sdpa, triton"):
        ProducerKVCache(model.config, 1, 8, "cpu", torch.float32, "auto")  # the engine resolves auto, not the cache


def snapshot(model) -> dict:
    """What generate() must leave as it was: the config, every module's attributes and the inference modules'
    globals (plain values compared by value, the rest by identity)."""
    import mlkv.inference.cache
    import mlkv.inference.engine
    import mlkv.model.modeling

    def fields(obj) -> dict:
        return {k: v if isinstance(v, (bool, int, float, str, type(None))) else id(v) for k, v in vars(obj).items()}

    modules = (mlkv.inference.attention, mlkv.inference.cache, mlkv.inference.engine, mlkv.model.modeling)
    return {"config": model.config.to_dict(), "attn": model.config._attn_implementation,
            "modules": {name: fields(m) for name, m in model.named_modules()},
            "globals": {m.__name__: fields(m) for m in modules}}


def test_running_the_engine_changes_nothing_on_the_model_nor_any_module_state(reference_kernel, monkeypatch):
    """The backend, the column ranges and the fused weights travel as data (the cache and forward arguments): while
    the engine runs the model (seen from inside the kernel call), no config field, module attribute or global has
    changed."""
    from mlkv.inference import kernels

    model = paper_model("MLKV-6")
    engine = MLKVEngine(model, bucket=8, decode_attention="triton")
    inner, seen = kernels.decode_attention, []

    def kernel_that_looks(*args):
        seen.append(snapshot(model))
        return inner(*args)

    monkeypatch.setattr(kernels, "decode_attention", kernel_that_looks)
    before = snapshot(model)
    engine.generate(prompts_of([5, 9]), 4, stop_tokens=[])
    assert len(seen) == 3 * model.config.num_hidden_layers  # every layer of the 3 decode steps
    assert all(s == before for s in seen)
    assert snapshot(model) == before
