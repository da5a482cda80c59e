"""The training objective: ``LossModel`` wraps the model (and the teacher) so that one forward returns the loss.

Objectives: ``lm`` (next-token cross-entropy, mean over all ``B * (T - 1)`` predicted tokens) and ``distill``:
``alpha * tau^2 * KL(teacher || student) + (1 - alpha) * lm`` with the temperature-``tau`` distributions of the
teacher (``--teacher``, e.g. the original unconverted model; same process, eval mode, no grad, bf16 on CUDA) and of
the student, averaged over all ``B * T`` positions, plus ``--distill-hidden`` times a layer-wise hidden-state distance
to the teacher (``hidden_distance``: the mean over decoder layers of ``|h_s - h_t|^2 / |h_t|^2``; default 10, 0 =
logits only; it needs a teacher of the student's depth and width, as the unconverted model is). On a converted
MLKV-6 at equal tokens the hidden term took distillation from 9% to 36% of the base-to-LM perplexity gap closed
(``benchmarks/distill_variants.py``).
The logits and the KL are computed in chunks over the sequence (``--loss-chunk-tokens``, default 16384 tokens for
distillation), each chunk recomputed in the backward pass, so no ``(B, T, vocab)`` tensor is ever held whole.
``--lm-loss liger`` computes ``lm``'s cross-entropy with liger-kernel's fused linear cross-entropy instead (issue 20's
candidate for the 49,152-token head of SmolLM2; CUDA only), checked against the torch path on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from mlkv.training.config import DEFAULT_CHUNK_TOKENS

__all__ = ["LossModel", "hidden_distance", "decoder_layers", "fused_cross_entropy", "IGNORE"]

IGNORE = -100  # target of the last position, which predicts nothing


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (classes named in ``_no_split_modules``)."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in classes]


class LossModel(nn.Module):
    """Wraps the model so that DDP/FSDP see one forward that returns the loss.

    ``forward(input_ids)`` -> ``(loss, lm, kl, hidden)``: ``lm`` the mean over the ``B * (T - 1)`` predicted tokens,
    ``kl`` the mean over all ``B * T`` positions (the teacher's last-position distribution is a target too; 0 without
    a teacher), ``hidden`` the layer-wise hidden-state distance (see ``hidden_distance``; 0 unless ``hidden_weight``),
    all three detached; ``forward(input_ids, evaluate=True)`` -> ``(sum of lm losses, tokens)``. The teacher is kept
    outside the module tree, so it is never wrapped, sharded or saved.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module | None = None, temperature: float = 1.0,
                 alpha: float = 1.0, chunk_tokens: int = 0, hidden_weight: float = 0.0, lm_loss: str = "torch"):
        super().__init__()
        self.model = model
        self.fused_ce = fused_cross_entropy(lm_loss) if teacher is None else None
        self._teacher = (teacher,)
        self.temperature, self.alpha, self.chunk_tokens = temperature, alpha, chunk_tokens
        self.hidden_weight = hidden_weight if teacher is not None else 0.0
        self._loss_chunk = self._chunk

    def compile_layers(self, **kwargs) -> None:
        """``torch.compile`` each decoder layer (in place: parameter names stay), the teacher's layers (inference
        only, so a graph without a backward) and the logits/loss chunk.

        Not the whole forward: transformers' ``create_causal_mask`` builds an explicit mask when traced by dynamo,
        which turns SDPA's causal kernel into a masked, non-causal one (2-3x slower attention at seq 2048); eager, it
        returns ``None`` and attention stays ``is_causal``.
        """
        teacher_layers = decoder_layers(self.teacher) if self.teacher is not None else []
        for layer in decoder_layers(self.model) + teacher_layers:
            layer.compile(**kwargs)
        self._loss_chunk = torch.compile(self._chunk, **kwargs)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    def forward(self, input_ids: torch.Tensor, evaluate: bool = False):
        layers = self.hidden_weight > 0 and not evaluate
        out = self.model.base_model(input_ids=input_ids, use_cache=False, output_hidden_states=layers)
        # Logits at all T positions (whole-tile GEMM shapes, no strided copy); the last has no target.
        hidden = out.last_hidden_state  # (B, T, H)
        targets = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE)  # (B, T)
        predicted = input_ids.shape[0] * (input_ids.shape[1] - 1)
        if evaluate:
            return self._sums(hidden, targets, None, DEFAULT_CHUNK_TOKENS, recompute=False)[0], predicted
        if self.teacher is None:
            ce = self._lm_sum(hidden, targets) / predicted
            zero = torch.zeros_like(ce).detach()
            return ce, ce.detach(), zero, zero
        with torch.no_grad():
            teacher_out = self.teacher.base_model(input_ids=input_ids, use_cache=False, output_hidden_states=layers)
        teacher_last = teacher_out.last_hidden_state  # (B, T, H)
        ce, kl = self._sums(hidden, targets, teacher_last, self.chunk_tokens, recompute=True)
        ce, kl = ce / predicted, kl / input_ids.numel()
        zero = torch.zeros_like(ce).detach()
        loss = self.alpha * self.temperature**2 * kl + (1.0 - self.alpha) * ce
        dist_h = zero
        if layers:
            dist_h = hidden_distance(out.hidden_states, teacher_out.hidden_states)
            loss = loss + self.hidden_weight * dist_h
        return loss, ce.detach(), kl.detach(), dist_h.detach()

    def _lm_sum(self, hidden, targets):
        """The summed cross-entropy of training without a teacher: liger's fused kernel (``--lm-loss liger``), else
        the logits in chunks (``_sums``, its eager reference)."""
        if self.fused_ce is None:
            return self._sums(hidden, targets, None, self.chunk_tokens, recompute=True)[0]
        head = self.model.get_output_embeddings()
        flat = hidden.flatten(0, 1)  # (B, T, H) -> (B*T, H)
        return self.fused_ce(head.weight, flat, targets.flatten(), head.bias)

    def _sums(self, hidden, targets, teacher_hidden, chunk_tokens: int, recompute: bool):
        """Summed cross-entropy and KL over chunks of ``chunk_tokens`` tokens (whole sequence if 0)."""
        B, T = targets.shape
        chunk = T if not chunk_tokens else max(1, chunk_tokens // B)
        if chunk >= T:
            return self._loss_chunk(hidden, targets, teacher_hidden)
        ce = kl = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, T, chunk):
            args = (hidden[:, s:s + chunk], targets[:, s:s + chunk],
                    None if teacher_hidden is None else teacher_hidden[:, s:s + chunk])
            if recompute and torch.is_grad_enabled():
                c_ce, c_kl = activation_checkpoint(self._loss_chunk, *args, use_reentrant=False)
            else:
                c_ce, c_kl = self._loss_chunk(*args)
            ce, kl = ce + c_ce, kl + c_kl
        return ce, kl

    def _chunk(self, hidden, targets, teacher_hidden):
        logits = self.model.get_output_embeddings()(hidden).float()  # (B, C, V)
        if teacher_hidden is None:
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE)
            return ce, logits.new_zeros(())
        with torch.no_grad():
            teacher_logits = self.teacher.get_output_embeddings()(teacher_hidden).float()  # (B, C, V)
            teacher_logp = F.log_softmax(teacher_logits / self.temperature, dim=-1)
        student_logp = F.log_softmax(logits / self.temperature, dim=-1)  # (B, C, V)
        # KL(teacher || student) = sum_v p_t (log p_t - log p_s), summed over the chunk's tokens.
        kl = F.kl_div(student_logp.flatten(0, 1), teacher_logp.flatten(0, 1), reduction="sum", log_target=True)
        # The cross-entropy from the same log-probabilities at temperature 1 (one pass over the (B, C, V) logits
        # fewer), and without a gradient when alpha = 1, where it is only reported.
        needs_grad = torch.is_grad_enabled() and self.alpha < 1.0
        if self.temperature == 1.0:
            logp = student_logp if needs_grad else student_logp.detach()
        else:
            with torch.set_grad_enabled(needs_grad):
                logp = F.log_softmax(logits, dim=-1)  # (B, C, V)
        ce = F.nll_loss(logp.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE)
        return ce, kl


def fused_cross_entropy(lm_loss: str):
    """The summed cross-entropy of ``(head weight, hidden (N, H), targets (N,), head bias)`` computed without the
    ``(N, vocab)`` logits, or ``None`` for torch's path (``_chunk``, the eager reference it is tested against)."""
    if lm_loss == "torch":
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")


def hidden_distance(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Layer-wise hidden-state distillation: the mean over layers of ``|h_s - h_t|^2 / |h_t|^2`` (means over all
    ``B * T * hidden`` elements of the micro-batch), for the output of every decoder layer (the last one after the
    final norm). The embedding output is skipped: a converted student shares it with its teacher. Relative, so every
    layer counts alike whatever the scale of its residual stream. The normaliser is the micro-batch's own, so
    splitting a batch differently (ranks, ``--grad-accum``) changes the objective slightly (gradients differ by
    ~3e-4 relative between 1 x 4 and 2 x 2 sequences), unlike the KL and cross-entropy terms. Each layer's term is
    recomputed in the backward pass instead of keeping a float32 copy of the difference."""
    if len(student) != len(teacher) or student[-1].shape != teacher[-1].shape:
        raise ValueError(f"hidden-state distillation needs a teacher of the student's shape: {len(teacher) - 1} "
                         f"layers of {teacher[-1].shape[-1]} against {len(student) - 1} of {student[-1].shape[-1]} "
                         "(use --distill-hidden 0 to distill from the logits only)")
    terms = []
    for s, t in zip(student[1:], teacher[1:]):
        if torch.is_grad_enabled() and s.requires_grad:
            terms.append(activation_checkpoint(_relative_distance, s, t.detach(), use_reentrant=False))
        else:
            terms.append(_relative_distance(s, t.detach()))
    return torch.stack(terms).mean()


def _relative_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return (s.float() - t).square().mean() / t.square().mean().clamp_min(1e-12)

