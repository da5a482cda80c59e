"""What a run reports: ``metrics.jsonl`` (+ TensorBoard), the progress bar, throughput and MFU.

Throughput: tokens/s count every token of each optimizer step over its wall time, over the steady steps (the first
``WARMUP_STEPS``, compilation and warm-up, left out); the progress bar shows the same figure as the run's summary,
updated at every step. MFU uses the PaLM-style model
FLOPs per token, ``6 * N + 12 * L * d_attn * T``: ``N`` = parameters that take part in matrix products (all
parameters but the input embedding, which is a lookup; the output projection is counted, a fifth of the work at
the Pythia-160M shape), ``L`` layers, ``d_attn = heads * head_dim``, ``T`` the sequence length (attention scores
and values, forward and backward, full ``T x T`` as PaLM counts them although the causal kernel skips half).
Recomputation (activation checkpointing, chunked loss) and the teacher's forward are not counted. The peak is
``--peak-tflops`` or a table of dense bf16 peaks of known cards; ``benchmarks/train_throughput.py`` measures it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["METRICS_FILE", "PEAK_BF16_FLOPS", "model_flops_per_token", "peak_flops", "Metrics", "StepValues",
           "Progress"]

METRICS_FILE = "metrics.jsonl"
#: Steps left out of the throughput (compilation, allocator and cache warm-up), when there are more.
WARMUP_STEPS = 3
#: Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, first match wins; ``--peak-tflops`` overrides.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
                   ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12))


def model_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, ``6 * N + 12 * L * d_attn * T`` (see the module docstring)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    n = sum(p.numel() for p in model.parameters()) - (0 if tied else embedding.numel())
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq_len


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """One device's dense bf16 peak (FLOP/s): ``override_tflops``, else the table's entry for this card."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


class Metrics:
    """metrics.jsonl (+ TensorBoard when installed), rank 0 only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None, tensorboard: bool | None):
        self.file = None
        self.writer = None
        if not enabled:
            return
        path = out / METRICS_FILE
        kept = []
        if resume_step is not None and path.is_file():  # drop records past the checkpoint being resumed
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line + "\n")
        self.file = path.open("w")
        self.file.writelines(kept)
        self.file.flush()
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                if tensorboard:
                    logger.warning("TensorBoard requested but the tensorboard package is not installed")

    def log(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


@dataclass
class StepValues:
    """One optimizer step's statistics, read on the host (means over the micro-steps and the ranks)."""

    step: int
    loss: float
    lm: float
    kl: float
    hidden: float
    grad_norm: float
    lr: float
    tokens: int  # trained so far, this step's included


class Progress:
    """The per-step record of a run: its losses and step times (for the summary), a metrics.jsonl record every
    ``log_every`` steps with the means since the last one, the progress bar, and the evaluations.

    Step time: between the completions of consecutive steps, so that reading a step late, or two at once before an
    evaluation or the end, does not skew it: on CUDA the GPU's (an event recorded after each step), elsewhere the
    host's (``done_at``, taken when the step returned; the CPU runs synchronously).
    """

    def __init__(self, metrics: Metrics, *, tokens_per_step: int, flops_per_token: float, peak: float | None,
                 log_every: int, end_step: int, total_steps: int, start_step: int, main: bool, progress: bool,
                 log_kl: bool, log_hidden: bool):
        self.metrics = metrics
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = peak  # of all ranks together
        self.log_every, self.end_step = log_every, end_step
        self.log_kl, self.log_hidden = log_kl, log_hidden
        self.main, self.progress = main, progress
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self._interval = self._empty_interval()
        self._last_time, self._last_event = time.perf_counter(), None
        self._steady_seconds = 0.0  # sum of step_seconds[WARMUP_STEPS:]
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (progress and main))

    @staticmethod
    def _empty_interval() -> dict[str, float]:
        return dict.fromkeys(("loss", "lm", "kl", "hidden", "steps", "seconds"), 0.0)

    def _mfu(self, tokens_per_s: float) -> float | None:
        return self.flops_per_token * tokens_per_s / self.peak if self.peak else None

    def _seconds(self, event: torch.cuda.Event | None, done_at: float) -> float:
        """This step's time: GPU time since the previous step's event, else host time since the previous step
        finished (since the bar started, for the first)."""
        if event is not None and self._last_event is not None:
            event.synchronize()
            seconds = self._last_event.elapsed_time(event) / 1000.0
        else:
            seconds = done_at - self._last_time
        self._last_time, self._last_event = done_at, event
        return seconds

    def step(self, values: StepValues, event: torch.cuda.Event | None, done_at: float) -> None:
        """Record a step that finished (``event``: recorded after its GPU work, on CUDA; ``done_at``: the
        ``time.perf_counter()`` at which the host finished it)."""
        seconds = self._seconds(event, done_at)
        self.losses.append(values.loss)
        self.step_seconds.append(seconds)
        if len(self.step_seconds) > WARMUP_STEPS:
            self._steady_seconds += seconds
        for key, value in (("loss", values.loss), ("lm", values.lm), ("kl", values.kl), ("hidden", values.hidden),
                           ("steps", 1), ("seconds", seconds)):
            self._interval[key] += value
        rate = self.throughput()["tokens_per_s"]
        postfix = {"loss": f"{values.loss:.4f}", "tok/s": f"{rate:,.0f}"}
        if self.peak:
            postfix["mfu"] = f"{self._mfu(rate):.1%}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        if values.step % self.log_every == 0 or values.step == self.end_step:
            self._log_interval(values)

    def _log_interval(self, values: StepValues) -> None:
        n = self._interval["steps"]
        rate = n * self.tokens_per_step / self._interval["seconds"]
        record = {"step": values.step, "loss": self._interval["loss"] / n, "lm_loss": self._interval["lm"] / n,
                  "lr": values.lr, "grad_norm": values.grad_norm, "tokens": values.tokens, "tokens_per_s": rate,
                  "mfu": self._mfu(rate)}
        if self.log_kl:
            record["kl"] = self._interval["kl"] / n
        if self.log_hidden:
            record["hidden"] = self._interval["hidden"] / n
        self.metrics.log(record)
        self._interval = self._empty_interval()

    def evaluation(self, step: int, result: dict) -> None:
        """Log an evaluation's result; rank 0 also prints it (above the bar, or to the log without one)."""
        self.metrics.log({"step": step, **result})
        if self.main:
            (self.bar.write if self.progress else logger.info)(
                f"step {step}: val loss {result['val_loss']:.4f}, ppl {result['val_ppl']:.2f}")

    def throughput(self) -> dict:
        """Tokens/s and MFU over the steady steps so far: those after the first ``WARMUP_STEPS`` (compilation and
        warm-up), or the last step while there are no more. The progress bar shows this figure at every step."""
        n = len(self.step_seconds)
        if n == 0:
            return {}
        steps, seconds = (n - WARMUP_STEPS, self._steady_seconds) if n > WARMUP_STEPS else (1, self.step_seconds[-1])
        tokens_per_s = self.tokens_per_step * steps / seconds if seconds > 0 else float("inf")
        return {"tokens_per_s": tokens_per_s, "mfu": self._mfu(tokens_per_s)}

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
