"""A fast batched decoding engine for ``MLKVForCausalLM``: producer-only static KV cache, one-pass padded prefill,
CUDA-graph decode steps.

Usage::

    engine = MLKVEngine(model)                                   # any MLKVForCausalLM, any sharing plan
    out = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)  # greedy; prompts of different lengths
    out.tokens                                                   # list of new-token lists, cut after a stop token
    out = engine.generate(prompts, 32, do_sample=True, temperature=0.8, top_k=50, top_p=0.95, seed=0,
                          stop_tokens=[[7], [9, 11]])            # one stop set per row (or one list for all rows)
    step = engine.full_context_step(batch_size=64, context=1024)  # for timing: each call runs one decode step

Design
------
*One definition of the math.* The engine runs the model's own ``forward`` (embedding, ``MLKVDecoderLayer``,
``MLKVAttention``, rotary, norms, ``lm_head``) with what it brings passed in as data: its cache
(``cache.ProducerKVCache``, which also brings the attention that reads it: ``attention.engine_attention`` with the
decode backend and each row's column range), a 4-D additive mask, and the stored fused Q/K/V weights
(``qkv_weights``). The engine changes nothing on the model or its config, and no module state.

* Prompts are LEFT-padded. Each row keeps its own rotary positions (``column - pad``), and every row writes a decode
  step at the same cache column, so a step's write is one ``index_copy_`` per K/V with a 1-element column tensor.
  The mask ``(B, 1, 1, W)`` (additive, model dtype; ``W`` = ``T_max`` rounded up to 16 so that the memory-efficient
  SDPA kernel takes it without padding) starts with each row's prompt columns open and every decode step opens its
  own column (``index_fill_``) before the layers run; the cache's per-row ``[start, end)`` say the same to the
  decode kernel. Prefill is ONE forward over the padded batch with a ``(B, 1, P, P)`` causal-and-padding mask, or
  with no mask (``is_causal``, flash attention) when all prompts have the same length.
* Bucketed attention length: a step at cache column ``c`` attends over the first
  ``S = min(ceil((c + 1) / bucket) * bucket, T_max)`` columns (masked beyond ``c``). Reads scale with the used
  context, not ``T_max``, and each bucket is one fixed-shape step, so it can be captured as a graph.
* On CUDA each (bucket, sampling mode) decode step is captured ONCE as a ``torch.cuda.CUDAGraph`` before the
  prefill (warm-up on a side stream first, graphs share one memory pool) and replayed. All step state lives in
  static device buffers (input token, per-row positions, cache column and ranges, mask, output buffer, finished
  flags, temperature / top-p), and the step advances them itself: the host only replays, with no ``.item()``, no
  allocation and no host-to-device copy per step. Sampling (``sampling.sample``) is inside the graph. Stop tokens:
  finished rows emit ``pad_token_id``; the host looks at the finished flags every ``stop_check_interval`` steps
  (one sync) to end early. The graph path is off on CPU.
* ``compile=True`` additionally runs the step through ``torch.compile`` (default mode, no cudagraphs of its own:
  the engine captures the compiled step itself) to fuse the small element-wise kernels; by default it then attends
  over the whole static cache (one compiled shape per engine setup, as gpt-fast does) unless ``bucket`` is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mlkv.inference.attention import DECODE_ATTENTION, choose_decode_attention, engine_attention
from mlkv.inference.cache import ProducerKVCache
from mlkv.inference.requests import normalize_prompts, stop_lists
from mlkv.inference.sampling import Sampling, sample

MASK_ALIGN = 16  # mask row stride multiple that the memory-efficient SDPA kernel takes without padding


@dataclass
class Generation:
    """``tokens``: new tokens per row, up to and including a stop token. ``output``: ``(B, max_new_tokens)`` with
    ``pad_token_id`` after a row's stop token (and past the last step run). Times in seconds."""

    tokens: list[list[int]]
    output: torch.Tensor
    prompt_lengths: list[int]
    steps: int
    prefill_seconds: float
    decode_seconds: float
    finished: list[bool] = field(default_factory=list)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ---- engine ---------------------------------------------------------------------------------------------------------
class MLKVEngine:
    """Batched generation with a producer-only static KV cache and CUDA-graph decode steps (see module docstring).

    ``max_batch_size`` / ``max_len``: allocate the cache now (and never grow it: a call needing more raises). Left
    ``None``, the engine sizes itself per call (batch = number of prompts, ``max_len`` = longest prompt +
    ``max_new_tokens``) and reallocates only when a call needs a different batch or a longer cache. A call with fewer
    prompts than the allocated batch fills the rest with dummy rows (same graphs, same cache).
    ``bucket``: attention length granularity of decode steps (``None``: whole cache). ``cuda_graphs``: ``None`` =
    on for CUDA models. ``compile``: run the step through ``torch.compile`` (``True`` or a mode string).
    ``fuse_qkv``: keep one concatenated Q/K/V weight per producer (``fused_bytes``; refreshed from the parameters at
    every ``generate``/``prepare``; passed to the model's forward as ``qkv_weights``) instead of concatenating the
    weights in every step.
    ``decode_attention``: ``"sdpa"`` (default: PyTorch's SDPA with the mask), ``"triton"`` (the grouped split-K
    kernel of ``mlkv.inference.kernels``, reading each row's ``[start, end)`` columns; CUDA only) or ``"auto"``
    (the kernel where it supports the model, else SDPA), resolved once here and given to every cache the engine
    builds (``ProducerKVCache.decode_attention``). SDPA stays the default until the kernel's speed is measured on
    the GPU (``benchmarks/decode_kernel.py``).
    """

    def __init__(self, model, *, max_batch_size: int | None = None, max_len: int | None = None,
                 bucket: int | None | str = "auto", cuda_graphs: bool | None = None, compile: bool | str = False,
                 pad_token_id: int | None = None, stop_check_interval: int = 16, fuse_qkv: bool = True,
                 decode_attention: str = "sdpa"):
        self.model = model
        self.config = model.config
        if not hasattr(self.config, "sharing"):
            raise TypeError(f"MLKVEngine needs an MLKVForCausalLM, got {type(model).__name__}")
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        rope_type = str(self.config.rope_parameters.get("rope_type", "default"))
        host_synced_rope = "dynamic" in rope_type or rope_type == "longrope"  # these read max(position) on the host
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and not host_synced_rope
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA model; this model is on {self.device}")
        self.cuda_graphs = bool(cuda_graphs)
        self.decode_attention = choose_decode_attention(decode_attention, self.config, self.device, self.dtype)
        if bucket == "auto":
            bucket = None if compile else 256
        if bucket is not None and bucket < 1:
            raise ValueError(f"bucket ({bucket}) must be a positive number of cache columns or None")
        self.bucket = bucket
        self.compile = compile
        self.pad_token_id = pad_token_id if pad_token_id is not None else (self.config.pad_token_id or 0)
        self.stop_check_interval = max(1, int(stop_check_interval))
        self._fixed_batch, self._fixed_len = max_batch_size, max_len
        self._step_fn = self._decode_step
        if compile:
            mode = compile if isinstance(compile, str) else None
            import torch._dynamo as dynamo  # (a plain "import torch._dynamo" would make torch a local name here)
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            self._step_fn = torch.compile(self._decode_step, mode=mode, dynamic=False)
        self._fused: dict[int, tuple] = {}
        if fuse_qkv:  # ordinary tensors even when built under inference_mode: refresh_weights updates them in place
            with torch.inference_mode(False), torch.no_grad():
                self._fused = {layer.self_attn.layer_idx: layer.self_attn.fused_qkv() for layer in model.model.layers
                               if layer.self_attn.is_producer}
        self.cache: ProducerKVCache | None = None
        self.batch_size = 0
        self.max_len = 0
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._generator = None
        if max_batch_size is not None or max_len is not None:
            if max_batch_size is None or max_len is None:
                raise ValueError("give both max_batch_size and max_len to preallocate, or neither")
            self.setup(max_batch_size, max_len)

    @torch.no_grad()
    def refresh_weights(self) -> None:
        """Copy the model's current Q/K/V parameters into the stored fused weights (after training, say).
        ``prepare`` (so every ``generate``) calls it; the copies keep their storage, so captured graphs stay valid."""
        for layer in self.model.model.layers:
            attn = layer.self_attn
            fused = self._fused.get(attn.layer_idx)
            if fused is None:
                continue
            dst, src = fused[0], attn.q_proj.weight
            if (dst.dtype, dst.device) != (src.dtype, src.device):
                raise RuntimeError(f"the model changed dtype/device since this engine was built ({dst.dtype} "
                                   f"on {dst.device} -> {src.dtype} on {src.device}): build a new MLKVEngine")
            attn.fused_qkv(out=fused)

    # ---- buffers ----------------------------------------------------------------------------------------------------
    @staticmethod
    def fused_bytes(config, dtype=torch.bfloat16) -> int:
        """Bytes of the stored fused Q/K/V weights (``fuse_qkv``): one copy of every producer's Q, K and V."""
        esize = torch.empty((), dtype=dtype).element_size()
        rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        per_layer = rows * (config.hidden_size + (1 if config.attention_bias else 0))
        return len(config.sharing.producers) * per_layer * esize

    @staticmethod
    def buffer_bytes(config, batch_size: int, max_len: int, dtype=torch.bfloat16, max_new_tokens: int = 1) -> int:
        """Bytes ``setup`` allocates (cache + step state), for memory planning without allocating."""
        esize = torch.empty((), dtype=dtype).element_size()
        cache = config.sharing.kv_bytes_per_token(config.head_dim, dtype) * batch_size * max_len
        mask = batch_size * _round_up(max_len, MASK_ALIGN) * esize
        state = batch_size * (8 * (2 + max_new_tokens + 8) + 1)
        return cache + mask + state

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def setup(self, batch_size: int, max_len: int, max_new_tokens: int = 1) -> None:
        """Allocate the cache and the step state for ``batch_size`` rows and ``max_len`` cache columns (kept when
        the shape is unchanged; the output buffer grows to ``max_new_tokens`` columns without touching the cache)."""
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and max_len ({max_len}) must be positive")
        if self.cache is not None and batch_size == self.batch_size and max_len == self.max_len:
            if max_new_tokens > self.out.shape[1]:
                self._graphs.clear()  # the graphs write into the old output buffer
                self.out = torch.full((batch_size, max_new_tokens), self.pad_token_id, dtype=torch.long,
                                      device=self.device)
            return
        self.release()
        dev, B = self.device, batch_size
        self.cache = ProducerKVCache(self.config, B, max_len, dev, self.dtype, self.decode_attention)
        self.batch_size, self.max_len = B, max_len
        self.col = self.cache.col  # (1,) cache column of the current step's token
        neg = torch.finfo(self.dtype).min
        self.mask = torch.full((B, 1, 1, _round_up(max_len, MASK_ALIGN)), neg, device=dev, dtype=self.dtype)
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=dev)  # current input token
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)  # its rotary position (per row)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # output column of the next emitted token
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.out = torch.full((B, max(max_new_tokens, 1)), self.pad_token_id, dtype=torch.long, device=dev)
        self.stop_ids = torch.full((B, 8), -1, dtype=torch.long, device=dev)
        self._pad = torch.full((), self.pad_token_id, dtype=torch.long, device=dev)
        self._temperature = torch.ones(1, dtype=torch.float32, device=dev)
        self._top_p = torch.ones(1, dtype=torch.float32, device=dev)
        if self.cuda_graphs:
            self._pool = torch.cuda.graph_pool_handle()

    def release(self) -> None:
        """Free the cache, the step state and the captured graphs."""
        self._graphs.clear()
        self._pool = None
        self.cache = None
        for name in ("mask", "tok", "pos", "step", "done", "out", "stop_ids", "col", "_pad", "_temperature",
                     "_top_p"):
            self.__dict__.pop(name, None)
        self.batch_size = self.max_len = 0

    # ---- one step ---------------------------------------------------------------------------------------------------
    def _bucket_len(self, col: int) -> int:
        if self.bucket is None:
            return self.max_len
        return min(_round_up(col + 1, self.bucket), self.max_len)

    def _forward(self, ids, mask, pos) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1, qkv_weights=self._fused or None)
        return out.logits[:, -1]  # (B, V)

    def _emit(self, nxt: torch.Tensor, check_stops: bool) -> None:
        nxt = torch.where(self.done, self._pad, nxt)
        self.out.index_copy_(1, self.step, nxt[:, None])
        if check_stops:
            self.done |= (nxt[:, None] == self.stop_ids).any(-1)
        self.tok.copy_(nxt[:, None])
        self.pos.add_(1)
        self.col.add_(1)
        self.step.add_(1)

    def _decode_step(self, kv_len: int, key: tuple, check_stops: bool, generator=None) -> None:
        """One token for every row, reading and advancing the static state only (captured as a graph on CUDA)."""
        self.cache.kv_len = kv_len
        self.mask.index_fill_(-1, self.col, 0.0)  # the current token's column opens for every row
        self.cache.end.copy_(self.col + 1)  # (B,) from (1,): the same column range end for every row
        logits = self._forward(self.tok, self.mask[..., :kv_len], self.pos)
        self._emit(sample(logits, key, self._temperature, self._top_p, generator), check_stops)

    def _capture(self, kv_len: int, key: tuple, check_stops: bool) -> None:
        gkey = (kv_len, key, check_stops)
        if gkey in self._graphs:
            return
        fn = self._step_fn

        def reset():  # valid indices for warm-up runs; the prefill resets all state afterwards
            self.col.fill_(kv_len - 1)
            self.step.zero_()
            self.done.zero_()

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # cuBLAS handles, SDPA kernel choice, compile
                reset()
                fn(kv_len, key, check_stops)
        torch.cuda.current_stream().wait_stream(stream)
        reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn(kv_len, key, check_stops)
        self._graphs[gkey] = graph

    def _run_step(self, kv_len: int, key: tuple, check_stops: bool) -> None:
        graph = self._graphs.get((kv_len, key, check_stops))
        if graph is not None:
            graph.replay()
        else:
            self._step_fn(kv_len, key, check_stops, self._generator)

    # ---- generation -------------------------------------------------------------------------------------------------
    def prepare(self, batch: int, prompt_len: int, max_new_tokens: int, sampling: Sampling = Sampling(),
                stops: list[list[int]] | None = None) -> None:
        """Allocate (if needed), load the stop ids and capture the decode graphs a call of this shape replays."""
        need = prompt_len + max_new_tokens
        if need > self.config.max_position_embeddings:
            raise ValueError(f"prompt length ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {need} exceeds "
                             f"max_position_embeddings ({self.config.max_position_embeddings})")
        if self._fixed_batch is not None:
            if batch > self._fixed_batch:
                raise ValueError(f"{batch} prompts but the engine was built for max_batch_size={self._fixed_batch}")
            if need - 1 > self._fixed_len:
                raise ValueError(f"prompt length ({prompt_len}) + max_new_tokens ({max_new_tokens}) needs "
                                 f"{need - 1} cache columns but the engine was built with max_len={self._fixed_len}")
            self.setup(self._fixed_batch, self._fixed_len, max_new_tokens)
        else:
            length = self.max_len if self.batch_size == batch and self.max_len >= need - 1 else need
            self.setup(batch, length, max_new_tokens)
        stops = (stops or []) + [[]] * (self.batch_size - len(stops or []))
        self._set_stops(stops)
        self.refresh_weights()
        check_stops = any(stops)
        if self.cuda_graphs:
            with torch.no_grad():
                for kv_len in sorted({self._bucket_len(c) for c in range(prompt_len, need - 1)}):
                    self._capture(kv_len, sampling.key, check_stops)

    def _set_sampling(self, sampling: Sampling, seed: int | None) -> None:
        if sampling.do_sample:
            self._temperature.fill_(float(sampling.temperature))
            self._top_p.fill_(float(sampling.top_p if sampling.top_p is not None else 1.0))
        self._generator = None
        if seed is not None:
            if self.cuda_graphs or self.compile:  # graphs / compiled steps draw from the default generator
                if self.device.type == "cuda":
                    torch.cuda.manual_seed(seed)
                else:
                    torch.manual_seed(seed)
            else:
                self._generator = torch.Generator(self.device).manual_seed(seed)

    @torch.no_grad()
    def prefill(self, rows: list[list[int]], sampling: Sampling = Sampling(), check_stops: bool = False) -> int:
        """One forward over the left-padded batch; emits the first new token. Returns the padded prompt length."""
        B, n = self.batch_size, len(rows)
        rows = rows + [[self.pad_token_id]] * (B - n)  # dummy rows when fewer prompts than the allocated batch
        lengths = [len(r) for r in rows]
        P = max(lengths)
        dev = self.device
        ids = torch.tensor([[self.pad_token_id] * (P - len(r)) + r for r in rows], dtype=torch.long, device=dev)
        pad = torch.tensor([P - n_ for n_ in lengths], dtype=torch.long, device=dev)
        cols = torch.arange(P, device=dev)
        key_ok = cols[None, :] >= pad[:, None]  # (B, P)
        positions = (cols[None, :] - pad[:, None]).clamp_min(0)
        neg = torch.finfo(self.dtype).min
        if min(lengths) == P:
            mask4 = None  # no padding: plain causal attention (flash kernel)
        else:
            allowed = torch.ones(P, P, dtype=torch.bool, device=dev).tril()[None] & key_ok[:, None, :]
            allowed |= torch.eye(P, dtype=torch.bool, device=dev)[None]  # pad queries see themselves: no NaN
            mask4 = torch.zeros(B, 1, P, P, dtype=self.dtype, device=dev).masked_fill_(~allowed[:, None], neg)
        self.cache.kv_len = P
        self.cache.start.copy_(pad)  # the decode kernel's rows start after their padding (a 1-token prompt uses it)
        self.cache.end.fill_(P)
        logits = self._forward(ids, mask4, positions)
        self.mask.fill_(neg)
        self.mask[:, 0, 0, :P].masked_fill_(key_ok, 0.0)
        self.pos.copy_(torch.tensor(lengths, device=dev)[:, None] - 1)
        self.col.fill_(P - 1)
        self.step.zero_()
        self.done.zero_()
        self.out.fill_(self.pad_token_id)
        self._emit(sample(logits, sampling.key, self._temperature, self._top_p, self._generator), check_stops)
        return P

    @torch.no_grad()
    def decode(self, steps: int, first_col: int, sampling: Sampling = Sampling(), check_stops: bool = False,
               active_rows: int | None = None) -> int:
        """Run up to ``steps`` decode steps starting at cache column ``first_col``; returns the steps run."""
        key = sampling.key
        for i in range(steps):
            self._run_step(self._bucket_len(first_col + i), key, check_stops)
            if check_stops and (i + 1) % self.stop_check_interval == 0 and i + 1 < steps:
                if bool(self.done[:active_rows].all()):
                    return i + 1
        return steps

    def _set_stops(self, stops: list[list[int]]) -> None:
        width = max([len(s) for s in stops] + [1])
        if width > self.stop_ids.shape[1]:
            self.stop_ids = torch.full((self.batch_size, width), -1, dtype=torch.long, device=self.device)
            self._graphs = {k: g for k, g in self._graphs.items() if not k[2]}  # graphs that read stop ids
        table = torch.full(self.stop_ids.shape, -1, dtype=torch.long)
        for i, s in enumerate(stops):
            table[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        self.stop_ids.copy_(table)

    def _timer(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def _elapsed(a, b) -> float:
        if isinstance(a, float):
            return b - a
        return a.elapsed_time(b) / 1e3

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 32, *, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens=None,
                 seed: int | None = None) -> Generation:
        """Generate up to ``max_new_tokens`` tokens for each prompt (lists of ids, of any lengths, or a 2-D tensor).

        ``stop_tokens``: ``None`` = the model's ``generation_config.eos_token_id``; an id or a list of ids for all
        rows; or one entry per row (a list of ids, an id or ``None``), e.g. ``[[2], [5, 7], None]``; ``[]`` = none.
        A row ends at its first stop token (included in ``tokens``); the call ends when every row has ended.
        ``temperature`` / ``top_k`` / ``top_p`` apply when ``do_sample``; ``seed`` makes sampling reproducible.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be at least 1")
        rows = normalize_prompts(prompts, self.config.vocab_size)
        n = len(rows)
        sampling = Sampling(do_sample, temperature, top_k, top_p)
        stops = stop_lists(stop_tokens, n, getattr(self.model.generation_config, "eos_token_id", None))
        check = any(stops)
        P = max(len(r) for r in rows)
        self.prepare(n, P, max_new_tokens, sampling, stops)
        self._set_sampling(sampling, seed)
        t0 = self._timer()
        P = self.prefill(rows, sampling, check)
        t1 = self._timer()
        steps = self.decode(max_new_tokens - 1, P, sampling, check, active_rows=n)
        t2 = self._timer()
        out = self.out[:n, :steps + 1].cpu()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        prefill_s, decode_s = self._elapsed(t0, t1), self._elapsed(t1, t2)
        tokens, finished = [], []
        for i, row in enumerate(out.tolist()):
            cut = next((j + 1 for j, t in enumerate(row) if t in stops[i]), None)
            tokens.append(row[:cut] if cut is not None else row)
            finished.append(cut is not None)
        output = torch.full((n, max_new_tokens), self.pad_token_id, dtype=torch.long)
        output[:, :out.shape[1]] = out
        return Generation(tokens, output, [len(r) for r in rows], steps, prefill_s, decode_s, finished)

    @property
    def captured_graphs(self) -> int:
        """How many decode steps are captured as CUDA graphs now (one per attention length, sampling mode and
        stop-token check that a call needed)."""
        return len(self._graphs)

    # ---- memory probe and step timing -------------------------------------------------------------------------------
    @torch.no_grad()
    def probe_step(self, batch_size: int, context: int) -> None:
        """Allocate for ``batch_size`` x ``context`` and run one greedy decode step over the full context (no
        prefill, no graph): what a real decode step at that size needs. Raises ``torch.cuda.OutOfMemoryError``."""
        self.setup(batch_size, context)
        self.mask.fill_(0.0)
        self.cache.start.zero_()
        self.col.fill_(context - 1)
        self.pos.fill_(context - 1)
        self.step.zero_()
        self.done.zero_()
        self.tok.zero_()
        self._decode_step(context, Sampling().key, False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def full_context_step(self, batch_size: int, context: int) -> Callable[[], None]:
        """A function that runs exactly ONE greedy decode step of ``batch_size`` rows over a full ``context``-token
        cache, for timing a step (``mlkv bench``'s decode speed at the max batch).

        Allocates and warms up as ``probe_step`` does (the cache holds zeros rather than a prefill: a memory-bound
        step's time does not depend on the values), captures the step as a CUDA graph when the engine uses graphs,
        and returns a function that rewinds to the last cache column and runs the step (graph replay, compiled or
        eager step), so that every call does the same work and the cache never grows. Asynchronous on CUDA: the
        caller synchronizes around it."""
        self.probe_step(batch_size, context)
        key = Sampling().key
        if self.cuda_graphs:
            self._capture(context, key, False)

        def run_one_step() -> None:
            with torch.no_grad():
                self.col.fill_(context - 1)  # the same last column every time: the cache never grows
                self.step.zero_()
                self._run_step(context, key, False)

        return run_one_step


def generate(model, prompts, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop_tokens=None, **engine_kwargs) -> list[list[int]]:
    """One-shot helper (used by ``mlkv generate --engine fast``): the new tokens of each prompt.

    ``temperature`` 0 means greedy; above 0 it samples with ``top_k`` / ``top_p``."""
    engine = MLKVEngine(model, **engine_kwargs)
    out = engine.generate(prompts, max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                          top_k=top_k, top_p=top_p, seed=seed, stop_tokens=stop_tokens)
    return out.tokens


# The cache, sampling and attention names live in their own modules now; importing them from here keeps working.
__all__ = ["MLKVEngine", "Generation", "generate", "ProducerKVCache", "Sampling", "engine_attention",
           "DECODE_ATTENTION"]
