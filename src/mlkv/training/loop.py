"""Training loop for MLKV models: pretraining from a config/preset, uptraining from a checkpoint, distillation.

Usage (the ``mlkv train`` command; ``python -m mlkv.training`` takes the same flags)::

    mlkv train --model runs/pythia-160m-mlkv6 --data ../shared/data/corpus/gutenberg/ --out runs/up6 --tokens 20M
    mlkv train --model pythia-160m --plan mlkv-6 --tokenizer ../shared/data/tokenizers/gpt-neox-20b --data ... --out ...
    torchrun --nproc-per-node 8 -m mlkv.training --model ... --data ... --out ... [--fsdp]

Recipe (defaults follow the MLKV paper's uptraining: HF Trainer, AdamW 0.9/0.95, eps 1e-8, wd 0.01, lr 6e-4,
cosine, warmup ratio 0.2, sequence length 2048): AdamW with warmup and cosine decay (``runtime``), gradient clipping
at global norm 1.0, gradient accumulation (``--grad-accum``), bf16 autocast on CUDA with fp32 master weights,
optional activation checkpointing and ``--compile`` (``torch.compile`` of each decoder layer and of the logits/loss;
see ``LossModel.compile_layers``). The objectives are in ``loss``, checkpoints in ``checkpoint``, metrics and MFU in
``metrics``.

Budget: ``--tokens 20M`` (suffixes K/M/B/T) gives ``ceil(tokens / (micro_batch * grad_accum * world * seq_len))``
optimizer steps, or ``--steps N``. ``--stop-after-steps K`` stops (with a checkpoint) after step K while keeping
the schedule of the whole run, so a later ``--resume`` continues it.

A NaN/inf loss or gradient norm stops the run with ``NonFiniteLossError`` naming the step; the last good checkpoint
stays. (Each step's loss is read on the host one step late, while the next step runs, so the GPU never waits for the
host; the read happens at once before any evaluation or checkpoint.)

``train`` holds the output folder's lock (``mlkv.files.folder_lock``) throughout and runs these steps in order:
find the checkpoint to resume (checking the folder and the run's settings), load the models, load the data, build
the loss model, optimizer and schedule, restore or seed, then the optimizer steps (``_train_step``, read back by
``_read_step``, with ``_evaluate`` and ``_save`` between them), and finish (the final model and the summary).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from mlkv.checkpoints import companion_files
from mlkv.data.sources import check_sources
from mlkv.diskspace import check_room
from mlkv.files import atomic_json, folder_lock
from mlkv.model.provenance import TRAINING_RECORD
from mlkv.training.checkpoint import (CHECKPOINT, STATE_FILE, full_model_state, load_checkpoint, read_state,
                                      save_checkpoint, save_model, select_checkpoint)
from mlkv.training.config import DEFAULT_CHUNK_TOKENS, TrainConfig, TrainHooks, check_config, parse_tokens
from mlkv.training.loss import LossModel
from mlkv.training.metrics import Metrics, Progress, StepValues, model_flops_per_token, peak_flops
from mlkv.training.models import (check_seq_len, check_teacher_shape, check_vocab, load_student, load_teacher,
                                  load_trained, resolve_tokenizer, weight_bytes)
from mlkv.training.outdir import prepare_out_folder, remove_earlier_run, save_final_model, training_record
from mlkv.training.resume import check_run_settings, run_settings
from mlkv.training.runtime import (Dist, StopRequest, WarmupCosine, autocast_context, autocast_dtype, gradient_sync,
                                   make_optimizer, seed_all, setup_distributed, stop_on_signals, wrap_model)

if TYPE_CHECKING:
    from mlkv.data import PackedDataset

logger = logging.getLogger(__name__)

__all__ = ["train", "NonFiniteLossError", "TrainConfig", "TrainHooks"]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; the run stopped and wrote no checkpoint after it."""


@dataclass
class _Run:
    """A run's state, filled in by the steps of ``train`` in order."""

    cfg: TrainConfig
    ctx: Dist
    device: torch.device
    hooks: TrainHooks
    started: float = field(default_factory=time.perf_counter)
    resume_from: Path | None = None  # the checkpoint being resumed
    settings: dict = field(default_factory=dict)  # those that define the run (mlkv.training.resume), recorded
    overwritten: list[Path] = field(default_factory=list)  # the earlier run's files that --overwrite removes
    # models
    origin: str = ""  # "checkpoint" (uptraining), "random" (pretraining) or "resumed"
    tokenizer: str | None = None
    companions: list[Path] = field(default_factory=list)  # tokenizer and generation files saved with the model
    model: nn.Module = None  # the Hugging Face model
    teacher: nn.Module | None = None
    loss_model: LossModel = None  # wraps model (+ teacher); FSDP root under --fsdp
    step_fn: nn.Module = None  # loss_model, or loss_model in DDP
    fsdp: bool = False  # --fsdp with several processes
    params: list[nn.Parameter] = field(default_factory=list)  # the trained ones (sharded under FSDP)
    optimizer: torch.optim.Optimizer = None
    scheduler: torch.optim.lr_scheduler.LambdaLR = None
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    flops_per_token: float = 0.0
    # data
    train_ds: PackedDataset = None
    val_ds: PackedDataset | None = None
    data_stats: dict = field(default_factory=dict)
    # position
    total_steps: int = 0
    start_step: int = 0
    end_step: int = 0  # total_steps, or --stop-after-steps
    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    last_checkpoint: tuple[int, Path] | None = None
    stop: StopRequest = field(default_factory=StopRequest)
    stopped: bool = False  # by a signal (or a rank's signal)
    val: dict = field(default_factory=dict)  # the last evaluation

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def per_rank(self) -> int:
        """Sequences per rank per optimizer step."""
        return self.cfg.micro_batch_size * self.cfg.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.per_rank * self.ctx.world * self.cfg.seq_len


@dataclass
class _Pending:
    """A step whose statistics are still on the device, read one step late so that the GPU never waits."""

    step: int
    packed: torch.Tensor  # (6,): loss, lm, kl, hidden, gradient norm, stop flag
    lr: float
    tokens: int
    event: torch.cuda.Event | None  # recorded after the step's GPU work (CUDA)
    done_at: float  # perf_counter when the host finished the step (its end on CPU, where the work is synchronous)


def train(cfg: TrainConfig, *, datasets: tuple | None = None, hooks: TrainHooks | None = None) -> dict:
    """Run (or resume) a training run; returns a summary dict (steps, tokens, losses, val loss, throughput).

    ``datasets``: prebuilt ``(train, val_or_None)`` ``PackedDataset``s instead of ``cfg.data`` (benchmarks, tests).
    Raises ``NonFiniteLossError`` when the loss or the gradient norm is NaN/inf.
    """
    check_config(cfg, datasets is not None)
    ctx, device = setup_distributed(cfg)
    try:
        # The output folder is this run's until it returns: a second writer gets a FolderInUseError naming it.
        with folder_lock(cfg.out, "mlkv train") if ctx.main else contextlib.nullcontext():
            run = _Run(cfg, ctx, device, hooks or TrainHooks())
            _find_resume(run)
            _check_inputs(run)
            remove_earlier_run(run.overwritten)  # only now: a refused run leaves the earlier one as it was
            _load_models(run)
            _load_data(run, datasets)
            _build(run)
            _restore_or_seed(run)
            progress = _start_progress(run)
            try:
                _run_steps(run, progress)
            finally:
                progress.close()
            return _finish(run, progress)
    finally:
        if ctx.created_group:
            dist.destroy_process_group()


# ---- setting up -----------------------------------------------------------------------------------------------------
def _find_resume(run: _Run) -> None:
    """The checkpoint to resume under ``--resume`` (the newest intact one, its settings those of ``cfg``), and the
    output folder checked for what it may hold (``outdir.prepare_out_folder``)."""
    cfg, out, ctx = run.cfg, run.out, run.ctx
    run.settings = run_settings(cfg)
    if ctx.main:
        found = select_checkpoint(out) if cfg.resume else None
        run.overwritten = prepare_out_folder(out, resuming=found is not None, overwrite=cfg.overwrite)
        if cfg.resume and found is None:
            logger.warning("--resume: no checkpoint in %s, starting from the beginning", out)
    ctx.barrier()  # rank 0 made the intact checkpoint out/checkpoint
    if cfg.resume and (out / CHECKPOINT / STATE_FILE).is_file():
        run.resume_from = out / CHECKPOINT
        check_run_settings(read_state(run.resume_from), run.settings, out)


def _check_inputs(run: _Run) -> None:
    """What can be checked before anything loads, so that its error comes before any loading or progress bar: the
    model's config (its sizes, ``--seq-len`` within its positions, a distillation teacher's shape), the first document of every local data
    file, and room on the disk for the checkpoint (the model and AdamW's two moments, float32) and the final model."""
    cfg = run.cfg
    spec = str(run.resume_from or cfg.model)
    check_seq_len(cfg.seq_len, spec)
    if cfg.objective == "distill":
        check_teacher_shape(cfg.teacher, spec, cfg.distill_hidden)
    check_sources([*cfg.data, *(cfg.val_data or [])], cfg.text_field, cfg.allow_bad_text)
    model_bytes = run.ctx.main and weight_bytes(spec, None if run.resume_from else cfg.plan)
    if model_bytes:
        final = not cfg.stop_after_steps or cfg.stop_after_steps >= (cfg.steps or float("inf"))
        check_room(run.out, 3 * model_bytes + final * model_bytes,
                   "a checkpoint of the model and its optimizer state" + (" and the final model" if final else ""))


def _load_models(run: _Run) -> None:
    """The model (the checkpoint being resumed, else ``--model``), the teacher, the tokenizer; checked to fit."""
    cfg = run.cfg
    run.tokenizer = resolve_tokenizer(cfg.tokenizer, cfg.model)
    run.companions = companion_files(run.tokenizer)
    if run.resume_from is not None:
        run.model = load_trained(run.resume_from, "the checkpoint",
                                 fix="restore it, or start the run again with --overwrite")
        run.origin = "resumed"
    else:
        run.model, run.origin = load_student(cfg.model, cfg.plan, cfg.seed)
    if cfg.objective == "distill":
        dtype = autocast_dtype(cfg.precision, run.device) or torch.float32
        run.teacher = load_teacher(cfg.teacher, dtype, run.device)
    check_vocab(run.model, run.tokenizer, run.teacher)


def _load_data(run: _Run, datasets: tuple | None) -> None:
    """The training and validation ``PackedDataset``s: given, or tokenized (rank 0 first, filling the cache)."""
    cfg, ctx = run.cfg, run.ctx
    if datasets is not None:
        (run.train_ds, run.val_ds), run.data_stats = datasets, {}
    else:
        if run.tokenizer is None:
            raise ValueError(f"no tokenizer: --model {cfg.model} has no tokenizer.json; pass --tokenizer "
                             "(a tokenizer.json or a folder with one)")
        from mlkv.data import prepare_data

        cache_dir = cfg.cache_dir or os.environ.get("MLKV_CACHE") or str(Path.home() / ".cache" / "mlkv" / "tokens")
        kwargs = dict(train_sources=cfg.data, tokenizer_path=run.tokenizer, cache_dir=cache_dir, seq_len=cfg.seq_len,
                      val_sources=cfg.val_data or None, val_fraction=cfg.val_fraction, seed=cfg.seed,
                      text_field=cfg.text_field, max_documents=cfg.max_documents,
                      max_tokens=parse_tokens(cfg.max_data_tokens), progress=cfg.progress and ctx.main,
                      allow_bad_text=cfg.allow_bad_text)
        if ctx.world > 1 and not ctx.main:
            ctx.barrier()  # rank 0 tokenizes and fills the cache first
        run.train_ds, run.val_ds, run.data_stats = prepare_data(**kwargs)
        if ctx.world > 1 and ctx.main:
            ctx.barrier()
    if run.train_ds.seq_len != cfg.seq_len:
        raise ValueError(f"the training data has seq_len {run.train_ds.seq_len}, the config {cfg.seq_len}")


def _build(run: _Run) -> None:
    """The loss model on the device, wrapped for DDP/FSDP, its optimizer and learning-rate schedule."""
    cfg, device = run.cfg, run.device
    run.model.to(device).train()
    if cfg.activation_checkpointing:
        run.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    chunk = cfg.loss_chunk_tokens if cfg.loss_chunk_tokens is not None else (
        DEFAULT_CHUNK_TOKENS if run.teacher is not None else 0)
    run.loss_model = LossModel(run.model, run.teacher, cfg.distill_temperature, cfg.distill_alpha, chunk,
                               cfg.distill_hidden, cfg.lm_loss)
    run.flops_per_token = model_flops_per_token(run.model, cfg.seq_len)  # before sharding
    run.step_fn, run.fsdp = wrap_model(run.loss_model, cfg, run.ctx, device)
    run.optimizer = make_optimizer(run.loss_model, cfg, device)
    run.params = [p for p in run.loss_model.parameters() if p.requires_grad]
    run.total_steps = cfg.steps or math.ceil(parse_tokens(cfg.tokens) / run.tokens_per_step)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, WarmupCosine(run.total_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
    run.autocast = autocast_context(cfg, device)


def _restore_or_seed(run: _Run) -> None:
    """Optimizer, schedule, RNG and data position from the checkpoint being resumed; else seed the generators."""
    cfg, ctx = run.cfg, run.ctx
    derived = {"total_steps": run.total_steps, "data_fingerprint": run.train_ds.fingerprint()}
    run.settings.update(derived)
    if run.resume_from is not None:
        check_run_settings(read_state(run.resume_from), derived, run.out)
        state = load_checkpoint(run.resume_from, loss_model=run.loss_model, optimizer=run.optimizer,
                                scheduler=run.scheduler, rank=ctx.rank, device=run.device)
        run.start_step, run.samples_seen, run.tokens_seen = state["step"], state["samples_seen"], state["tokens_seen"]
        run.last_checkpoint = (run.start_step, run.resume_from)
    else:
        seed_all(cfg.seed * 1000 + ctx.rank)  # dropout streams differ between ranks
    run.step = run.start_step
    run.end_step = min(run.total_steps, cfg.stop_after_steps or run.total_steps)


def _start_progress(run: _Run) -> Progress:
    """The output folder, metrics.jsonl (records past a resumed checkpoint dropped) and the progress bar."""
    cfg, ctx = run.cfg, run.ctx
    if ctx.main:
        run.out.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    metrics = Metrics(run.out, ctx.main, run.start_step if run.resume_from is not None else None, cfg.tensorboard)
    peak = peak_flops(run.device, cfg.peak_tflops)
    if ctx.main:
        logger.info("model (%s): %.1fM parameters, %.3g FLOPs/token; %d steps of %d tokens (%s); data %s",
                    run.origin, sum(p.numel() for p in run.model.parameters()) / 1e6, run.flops_per_token,
                    run.total_steps, run.tokens_per_step,
                    f"from step {run.start_step}" if run.start_step else "from scratch", run.data_stats)
        epochs = run.total_steps * run.per_rank * ctx.world / len(run.train_ds)
        if epochs > 1:
            logger.warning("the budget covers the training data %.2f times", epochs)
    return Progress(metrics, tokens_per_step=run.tokens_per_step, flops_per_token=run.flops_per_token,
                    peak=peak * ctx.world if peak else None, log_every=cfg.log_every, end_step=run.end_step,
                    total_steps=run.total_steps, start_step=run.start_step, main=ctx.main, progress=cfg.progress,
                    log_kl=run.teacher is not None, log_hidden=bool(run.loss_model.hidden_weight))


# ---- the steps ------------------------------------------------------------------------------------------------------
def _run_steps(run: _Run, progress: Progress) -> None:
    """Optimizer steps until the end (or ``--stop-after-steps``, or a signal), evaluating and saving on schedule."""
    cfg, ctx = run.cfg, run.ctx
    batches = run.train_ds.batches(run.per_rank, run.samples_seen, loop=True, drop_last=True, rank=ctx.rank,
                                   world_size=ctx.world)
    pending = None
    with stop_on_signals() as request:
        run.stop = request
        while run.step < run.end_step:
            done = _train_step(run, next(batches))
            stop = _read_step(run, progress, pending) if pending is not None else False
            stop = stop or (ctx.world == 1 and request.signum is not None)  # several ranks: agreed flag only
            pending = done
            evaluate = run.val_ds is not None and (run.step == run.total_steps or
                                                   (cfg.eval_every and run.step % cfg.eval_every == 0))
            save = stop or run.step == run.end_step or (cfg.save_every and run.step % cfg.save_every == 0)
            if evaluate or save:
                stop = _read_step(run, progress, pending) or stop  # every rank reads the same all-reduced flag
                pending = None
                save = save or stop
            if evaluate:
                result = _evaluate(run)
                if result:
                    progress.evaluation(run.step, result)
                    run.val.update(result)
            if save:
                _save(run)
            if stop:
                run.stopped = True
                break


def _train_step(run: _Run, batch: torch.Tensor) -> _Pending:
    """One optimizer step on ``batch`` (``(per_rank, T)``: ``--grad-accum`` micro-batches); its statistics stay on
    the device."""
    cfg, ctx, device = run.cfg, run.ctx, run.device
    if device.type == "cuda":  # a copy from pinned memory does not wait for the queued GPU work
        batch = batch.pin_memory()
    batch = batch.to(device, non_blocking=True)
    totals = torch.zeros(4, device=device)  # loss, lm, kl, hidden of this step
    for i, micro in enumerate(batch.split(cfg.micro_batch_size)):  # (micro_batch_size, T) each
        with gradient_sync(run.step_fn, run.fsdp, ctx.world, i == cfg.grad_accum - 1), run.autocast():
            loss, lm, kl, dist_h = run.step_fn(micro)
        (loss / cfg.grad_accum).backward()
        totals += torch.stack([loss.detach(), lm, kl, dist_h]).float() / cfg.grad_accum
    if run.hooks.after_backward:
        run.hooks.after_backward(run.step + 1, run.model)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    flag = torch.tensor([float(run.stop.signum is not None)], device=device)
    packed = torch.cat([totals, grad_norm.detach().float().reshape(1).to(device), flag])  # (6,)
    if ctx.world > 1:
        dist.all_reduce(packed)
        packed[:5] /= ctx.world  # means of loss, lm, kl, hidden, gradient norm; the stop flag sums
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
    if event is not None:
        event.record()  # this step's GPU work is done when the stream reaches it
    run.step += 1
    run.samples_seen += run.per_rank * ctx.world
    run.tokens_seen += run.tokens_per_step
    done_at = time.perf_counter()
    if run.hooks.after_step:
        run.hooks.after_step(run.step, run.model)
    return _Pending(run.step, packed, lr, run.tokens_seen, event, done_at)


def _read_step(run: _Run, progress: Progress, pending: _Pending) -> bool:
    """Read one step's statistics (waits for its GPU work), stop on NaN/inf, log; True if a stop was asked.

    Called one step late (after the next step is queued) so that the GPU never waits for the host, and at once
    where the loop must agree on state: evaluation, checkpoints, the last step.
    """
    loss, lm, kl, hidden, norm, stop = pending.packed.tolist()
    if not (math.isfinite(loss) and math.isfinite(norm)):
        where = (f"the last good checkpoint (step {run.last_checkpoint[0]}) is {run.last_checkpoint[1]}"
                 if run.last_checkpoint else "no checkpoint was written")
        raise NonFiniteLossError(f"non-finite loss {loss} (gradient norm {norm}) at step {pending.step}; "
                                 f"training stopped; {where}")
    progress.step(StepValues(pending.step, loss, lm, kl, hidden, norm, pending.lr, pending.tokens), pending.event,
                  pending.done_at)
    return bool(stop)


def _evaluate(run: _Run) -> dict:
    """Validation loss and perplexity over ``--eval-batches`` batches, summed over the ranks."""
    cfg, ctx = run.cfg, run.ctx
    batch = cfg.micro_batch_size
    drop_last = ctx.world > 1  # every rank runs the same number of forwards (FSDP gathers in each)
    n = run.val_ds.num_batches(batch, drop_last=drop_last, world_size=ctx.world)
    if cfg.eval_batches:
        n = min(n, cfg.eval_batches)
    totals = torch.zeros(2, dtype=torch.float64, device=run.device)
    run.loss_model.eval()
    with torch.no_grad():
        batches = run.val_ds.batches(batch, 0, loop=False, drop_last=drop_last, rank=ctx.rank, world_size=ctx.world)
        for _, ids in zip(range(n), batches):
            with run.autocast():
                ce_sum, count = run.loss_model(ids.to(run.device), evaluate=True)
            totals += torch.stack([ce_sum.double(), torch.tensor(float(count), dtype=torch.float64,
                                                                 device=run.device)])
    run.loss_model.train()
    if ctx.world > 1:
        dist.all_reduce(totals)
    loss_sum, count = totals.tolist()
    if count == 0:
        return {}
    loss = loss_sum / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(count)}


def _save(run: _Run) -> None:
    """A checkpoint of the current step (every rank takes part)."""
    state = {"step": run.step, "samples_seen": run.samples_seen, "tokens_seen": run.tokens_seen,
             "total_steps": run.total_steps, "world_size": run.ctx.world, "config": dataclasses.asdict(run.cfg),
             "run": run.settings}
    folder = save_checkpoint(run.out, state, loss_model=run.loss_model, optimizer=run.optimizer,
                             scheduler=run.scheduler, ctx=run.ctx, device=run.device, fsdp=run.fsdp,
                             companions=run.companions)
    run.last_checkpoint = (run.step, folder)


# ---- the end --------------------------------------------------------------------------------------------------------
def _write_final_model(run: _Run, folder: Path, state: dict | None) -> None:
    """The final model with its tokenizer files and ``mlkv_training.json`` (``outdir.training_record``)."""
    save_model(run.model, folder, state, run.companions)
    atomic_json(folder / TRAINING_RECORD, training_record(run.cfg, run.step, run.tokens_seen, run.val))


def _finish(run: _Run, progress: Progress) -> dict:
    """The final model in ``--out`` if the run completed (``outdir.save_final_model``: a kill leaves no model or a
    whole one), the checkpoint before the last removed; the summary."""
    ctx = run.ctx
    if run.step < run.total_steps:
        if ctx.main:
            logger.warning("stopped after step %d of %d; continue with --resume", run.step, run.total_steps)
    else:
        model_state = full_model_state(run.loss_model, run.fsdp)
        if ctx.main:
            save_final_model(run.out, lambda folder: _write_final_model(run, folder, model_state))
            shutil.rmtree(run.out / (CHECKPOINT + ".old"), ignore_errors=True)
        ctx.barrier()
    summary = {"out": str(run.out), "origin": run.origin, "start_step": run.start_step,
               "total_steps": run.total_steps, "tokens_per_step": run.tokens_per_step,
               "flops_per_token": run.flops_per_token, "losses": progress.losses,
               "step_seconds": progress.step_seconds, "interrupted": run.stopped or run.step < run.total_steps,
               "data": run.data_stats, **run.val}
    if run.stopped:
        summary["stop_signal"] = run.stop.signum
    summary.update(steps=run.step, tokens=run.tokens_seen, final_loss=progress.losses[-1] if progress.losses else None,
                   checkpoint=str(run.last_checkpoint[1]) if run.last_checkpoint else None,
                   seconds=time.perf_counter() - run.started)
    summary.update(progress.throughput())
    return summary
