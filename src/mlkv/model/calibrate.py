"""The data-aware conversion init (``--init lsq``): fit each shared K/V projection by least squares.

A converted consumer layer ``l`` no longer projects its own keys ``W_l x_l``: it reads its producer ``p``'s keys
``W' x_p``, computed from the producer's input. The ``mean``/``pairwise``/``first`` inits pick ``W'`` from the
weights alone. This init picks the ``W'`` that reproduces, on calibration text run through the *original* model,
the keys (and values) of every layer the producer serves, as well as one linear map of ``x_p`` can:

    W' = argmin_W  sum_{l in served(p)} || W X_p - P(W_l) X_l ||^2  =  mean_l P(W_l) C_lp (C_pp + r I)^-1

with ``X_l`` (hidden, N) layer ``l``'s normed attention input over N calibration tokens, ``C_lp = X_l X_p^T``,
``P`` the mean-pooling of K/V heads into the plan's groups (least squares over several targets of one input fits
their mean, so pooling first loses nothing), and ``r`` a small ridge. Rotary does not enter: it rotates the fitted
and the original keys of one position by the same orthogonal map. A bias (Qwen2) is fitted as one more input
channel that is always 1.
"""

from __future__ import annotations

import torch
from torch import nn

from mlkv.model.sharing import SharingPlan

#: Ridge, relative to the mean diagonal of ``C_pp``.
RIDGE = 1e-4
#: Tokens per calibration sequence.
CALIBRATION_SEQ_LEN = 512


def calibration_tokens(src, sources: list[str] | None = None, tokens: int = 8192,
                       data_dir: str | None = None) -> torch.Tensor:
    """Token ids (S, ``CALIBRATION_SEQ_LEN``) of calibration text, tokenized with ``src``'s tokenizer: ``sources``
    (files, folders, ``hf:`` datasets) or by default the shared Gutenberg validation books."""
    from mlkv.data import read_documents
    from mlkv.data.paths import require_data_dir
    from mlkv.model.gguf import is_gguf, load_gguf

    if is_gguf(src):
        tok = load_gguf(src, with_tokenizer=True)[1]
    else:
        from mlkv.data import load_hf_tokenizer

        tok = load_hf_tokenizer(src)
    if not sources:
        sources = [str(require_data_dir(data_dir) / "corpus" / "gutenberg" / "val.jsonl.xz")]
    ids: list[int] = []
    for source in sources:
        for text in read_documents(source):
            ids += tok(text[: 40 * tokens])["input_ids"]  # (a few characters per token: this many always suffice)
            if len(ids) >= tokens:
                break
        if len(ids) >= tokens:
            break
    rows = max(1, min(len(ids), tokens) // CALIBRATION_SEQ_LEN)
    if len(ids) < CALIBRATION_SEQ_LEN:
        raise ValueError(f"calibration text gave {len(ids)} tokens; --init lsq needs at least {CALIBRATION_SEQ_LEN}")
    return torch.tensor(ids[: rows * CALIBRATION_SEQ_LEN]).view(rows, CALIBRATION_SEQ_LEN)  # (S, T)


@torch.no_grad()
def attention_inputs(model: nn.Module, token_ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Every layer's normed attention input ``X_l`` as (N, hidden) float32, for ``token_ids`` (S, T) run through
    ``model`` (an mlkv model whose layers all project K/V, i.e. the identity conversion of the source)."""
    layers = model.model.layers
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda _, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).float()))  # (B*T, hidden)
        for i, layer in enumerate(layers)]
    try:
        for start in range(0, token_ids.shape[0], batch_size):
            model(token_ids[start:start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(chunks) for chunks in seen]


def _augment(x: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if bias else x  # (N, hidden [+1])


def fit_shared_projection(targets: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]],
                          x_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares ``(weight, bias)`` mapping ``x_p`` (N, hidden) to the mean of the targets ``W_l x_l + b_l``.

    ``targets``: one ``(pooled weight (out, hidden), pooled bias (out,) or None, x_l (N, hidden))`` per layer."""
    bias = targets[0][1] is not None
    xp = _augment(x_p.double(), bias)  # (N, hidden [+1])
    gram = xp.T @ xp  # (hidden [+1], hidden [+1])
    ridge = RIDGE * gram.diagonal().mean()
    gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
    cross = torch.zeros(targets[0][0].shape[0], xp.shape[1], dtype=torch.float64)  # (out, hidden [+1])
    for weight, b, x_l in targets:
        w = torch.cat([weight, b[:, None]], dim=1) if bias else weight  # (out, hidden [+1])
        cross += w.double() @ (_augment(x_l.double(), bias).T @ xp)
    fitted = torch.linalg.solve(gram, (cross / len(targets)).T).T  # (out, hidden [+1])
    if bias:
        return fitted[:, :-1].float().contiguous(), fitted[:, -1].float().contiguous()
    return fitted.float().contiguous(), None


def least_squares_kv(state: dict[str, torch.Tensor], plan: SharingPlan, inputs: list[torch.Tensor],
                     pool) -> dict[str, torch.Tensor]:
    """The producers' K/V weights (and biases) for ``plan``, fitted on ``inputs`` (from ``attention_inputs``).

    ``state``: the source's mlkv-named state dict (every layer with K/V); ``pool(w)`` mean-pools a source K/V
    weight or bias to the plan's K/V heads. Returns only the producers' ``k_proj``/``v_proj`` entries."""
    out = {}
    for p in plan.producers:
        for proj in ("k_proj", "v_proj"):
            key = f"model.layers.{{i}}.self_attn.{proj}.{{kind}}"
            targets = [(pool(state[key.format(i=i, kind="weight")]),
                        pool(state[key.format(i=i, kind="bias")]) if key.format(i=i, kind="bias") in state else None,
                        inputs[i]) for i in plan.served_by(p)]
            weight, bias = fit_shared_projection(targets, inputs[p])
            out[key.format(i=p, kind="weight")] = weight
            if bias is not None:
                out[key.format(i=p, kind="bias")] = bias
    return out
