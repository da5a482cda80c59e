"""The training objective (mlkv.training.loss): chunked cross-entropy and KL, and the hidden-state distance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlkv.training.loss import LossModel, decoder_layers
from tiny import hf_neox, tiny_model


@pytest.mark.parametrize("temperature, alpha", [(2.0, 0.3), (1.0, 1.0), (1.0, 0.5), (2.0, 1.0)])
def test_chunked_kl_matches_full_logits(temperature, alpha):
    """The chunked, recomputed KL/CE equal the same quantities from whole (B, T, V) logits, gradients too (at
    temperature 1 the cross-entropy shares the KL's log-probabilities; at alpha 1 it has no gradient)."""
    student, teacher = tiny_model(layers=2).train(), hf_neox(seed=3)
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(0))
    loss, lm, kl, dist_h = LossModel(student, teacher, temperature, alpha, chunk_tokens=12)(ids)
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    logits = student(ids).logits.float()  # (B, T, V)
    with torch.no_grad():
        teacher_logits = teacher(ids).logits.float()
    ref_lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())  # T - 1 predicted tokens
    assert ref_lm.item() == pytest.approx(student(ids, labels=ids).loss.item(), abs=1e-6)  # the HF-style loss
    p_t = F.softmax(teacher_logits / temperature, -1)
    ref_kl = (p_t * (p_t.log() - F.log_softmax(logits / temperature, -1))).sum(-1).mean()  # all T positions
    ref = alpha * temperature**2 * ref_kl + (1 - alpha) * ref_lm
    ref.backward()
    assert kl > 0.01 and dist_h == 0  # no hidden-state term unless asked
    torch.testing.assert_close(lm, ref_lm.detach())
    torch.testing.assert_close(kl, ref_kl.detach())
    torch.testing.assert_close(loss.detach(), ref.detach())
    for got, p in zip(grads, student.parameters()):
        torch.testing.assert_close(got, p.grad)



def test_hidden_state_distillation():
    """``hidden_weight`` adds w * mean over decoder layers of |h_s - h_t|^2 / |h_t|^2 (embeddings skipped) to the
    KL objective, with its gradient; a student equal to its teacher is at distance 0."""
    teacher = tiny_model(layers=4, seed=1).eval()
    student = tiny_model(layers=4, plan="mlkv-2").train()
    own = student.state_dict()
    student.load_state_dict({k: v for k, v in teacher.state_dict().items()  # all but the K/V projections
                             if k in own and v.shape == own[k].shape}, strict=False)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, lm, kl, dist_h = LossModel(student, teacher, hidden_weight=0.5)(ids)
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    out_s = student(ids, use_cache=False, output_hidden_states=True)
    with torch.no_grad():
        out_t = teacher(ids, use_cache=False, output_hidden_states=True)
    h_s, h_t = out_s.hidden_states, out_t.hidden_states
    assert len(h_s) == 4 + 1 and torch.equal(h_s[0], h_t[0])  # embeddings + 4 layer outputs; embeddings shared
    ref_h = torch.stack([(s - t).square().mean() / t.square().mean() for s, t in zip(h_s[1:], h_t[1:])]).mean()
    ref_kl = F.kl_div(F.log_softmax(out_s.logits.float(), -1).flatten(0, 1),
                      F.log_softmax(out_t.logits.float(), -1).flatten(0, 1), reduction="batchmean", log_target=True)
    ref = ref_kl + 0.5 * ref_h
    ref.backward()
    assert dist_h > 1e-4
    torch.testing.assert_close(dist_h, ref_h.detach())
    torch.testing.assert_close(loss.detach(), ref.detach())
    for got, p in zip(grads, student.parameters()):
        torch.testing.assert_close(got, p.grad, msg=lambda m: f"gradient differs: {m}")
    same = LossModel(tiny_model(layers=4, seed=1), teacher, hidden_weight=1.0)
    assert same(ids)[3] == 0
    with pytest.raises(ValueError, match="teacher of the student's shape"):
        LossModel(tiny_model(layers=2, seed=1), teacher, hidden_weight=1.0)(ids)



@pytest.mark.slow
def test_compiled_distillation_computes_the_eager_loss_and_gradients():
    """``compile_layers`` (student and teacher layers and the loss chunk, the default on CUDA) is the same function
    as eager: distillation with the hidden-state term, chunked, gives equal losses and gradients."""
    teacher = tiny_model(layers=4, seed=1).eval().requires_grad_(False)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for compiled in (False, True):
        student = tiny_model(layers=4, plan="mlkv-2").train()
        loss_model = LossModel(student, teacher, alpha=0.5, chunk_tokens=12, hidden_weight=0.5)
        if compiled:
            loss_model.compile_layers()
        out = loss_model(ids)
        out[0].backward()
        results.append((out, [p.grad for p in student.parameters()]))
    (eager, eager_grads), (fast, fast_grads) = results
    for a, b in zip(eager, fast):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(eager_grads, fast_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in decoder_layers(teacher))


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_liger_fused_cross_entropy_computes_the_torch_loss_and_gradients(autocast):
    """``--lm-loss liger`` (liger-kernel's fused linear cross-entropy) against the torch path, its eager reference:
    in fp32 to fp32 rounding; under bf16 autocast (the training default on CUDA) to bf16 rounding."""
    pytest.importorskip("liger_kernel")
    ids = torch.randint(0, 96, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    results = {}
    for lm_loss in ("torch", "liger"):
        model = tiny_model("llama", seed=0).cuda().train()
        loss_model = LossModel(model, lm_loss=lm_loss)
        assert (loss_model.fused_ce is not None) == (lm_loss == "liger")
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            out = loss_model(ids)
        out[0].backward()
        results[lm_loss] = out, [p.grad for p in model.parameters()]
    (ref, ref_grads), (fused, fused_grads) = results["torch"], results["liger"]
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused[0].detach(), ref[0].detach(), **tol)
    for a, b in zip(ref_grads, fused_grads):
        torch.testing.assert_close(b, a, **tol)
