"""Tests of training runs (mlkv.training.train and the ``mlkv train`` command), on CPU in fp32: the tiny model of
``trainkit`` trained on 2 books of the shared Gutenberg val file, seq_len 64. Skipped when the shared data is
absent."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

import mlkv  # noqa: F401  (registers MLKV with the Auto classes)
from mlkv.cli import main as cli_main
from mlkv.errors import UsageError
from mlkv.training import NonFiniteLossError, TrainHooks, train
from mlkv.training.command import main
from mlkv.training.loss import LossModel
from mlkv.training.resume import ResumeMismatchError
from trainkit import (SRC, TOKENIZER, VAL_FILE, cli_flags, make_config, needs_data, read_metrics, step_losses,
                      write_config)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def trained(workdir) -> tuple[Path, dict]:
    """A 16-step pretraining run from a config.json (random init), evaluated at steps 8 and 16."""
    out = workdir / "trained"
    summary = train(make_config(workdir, out, steps=16, eval_every=8, lr=5e-3))
    return out, summary


# ---- errors ---------------------------------------------------------------------------------------------------------
@needs_data
def test_errors(workdir, tmp_path, trained):
    def cfg(**kw):
        return make_config(workdir, tmp_path / "out", **{"steps": 2, **kw})

    with pytest.raises(FileNotFoundError, match="no such checkpoint directory or config file"):
        train(cfg(model=str(tmp_path / "missing-model")))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        train(cfg(model=str(tmp_path)))
    with pytest.raises(ValueError, match="bad token count '20X'"):
        train(cfg(steps=None, tokens="20X"))
    with pytest.raises(ValueError, match="exactly one"):
        train(cfg(steps=None))
    with pytest.raises(ValueError, match="needs --teacher"):
        train(cfg(objective="distill"))
    with pytest.raises(FileNotFoundError, match="--teacher"):
        train(cfg(objective="distill", teacher=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="--lr must be positive, got 0"):
        train(cfg(lr=0.0))
    with pytest.raises(ValueError, match="--weight-decay must be >= 0, got -0.1"):
        train(cfg(weight_decay=-0.1))
    with pytest.raises(ValueError, match="--distill-hidden must be >= 0, got -1"):
        train(cfg(objective="distill", teacher=str(trained[0]), distill_hidden=-1.0))
    with pytest.raises(ValueError, match="objective 'mse' is unknown"):
        train(cfg(objective="mse"))
    with pytest.raises(ValueError, match="--plan applies to a random init"):
        train(cfg(model=str(trained[0]), plan="mqa"))
    with pytest.raises(ValueError, match="tokenizer has 50277 tokens but the model's vocab_size is 512"):
        train(cfg(model="tiny-neox"))
    with pytest.raises(ValueError, match="no tokenizer"):
        train(cfg(model="tiny-neox", tokenizer=None))
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(make_config(workdir, trained[0], steps=2))
    with pytest.raises(SystemExit):
        main(["--data", "x", "--out", str(tmp_path)])  # --model missing


@needs_data
def test_cli(workdir, tmp_path, capsys):
    """``mlkv train`` flags -> TrainConfig; --tokens 512 at 4 x 64 tokens per step is 2 steps."""
    out = tmp_path / "cli"
    status = main(["--model", str(write_config(workdir)), "--tokenizer", str(TOKENIZER), "--data", str(VAL_FILE),
                   "--max-documents", "2", "--cache-dir", str(workdir / "cache"), "--seq-len", "64",
                   "--micro-batch-size", "4", "--tokens", "512", "--out", str(out), "--no-progress",
                   "--no-tensorboard"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status == 0 and summary["steps"] == 2 and summary["total_steps"] == 2 and summary["tokens"] == 512
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


@needs_data
def test_seq_len_above_the_models_positions_is_refused_before_the_data_is_read(workdir, tmp_path):
    with pytest.raises(UsageError, match=r"--seq-len 256 is above the model's max_position_embeddings \(128, "
                                         r".*tiny.json\): use --seq-len 128 or less"):
        train(make_config(workdir, tmp_path / "out", steps=1, seq_len=256, data=["/nonexistent.jsonl"]))


@needs_data
def test_a_model_folder_whose_save_was_interrupted_is_an_error_not_a_random_init(workdir, tmp_path, trained):
    """config.json and a tokenizer but no weights: what an interrupted save leaves, not a config to pretrain from."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(trained[0] / name, broken / name)
    with pytest.raises(FileNotFoundError, match=r"--model .*broken: config.json but no weights \(\*.safetensors\); "
                                                r"an interrupted save\?"):
        train(make_config(workdir, tmp_path / "out", model=broken, steps=1))
    shutil.copytree(trained[0], broken, dirs_exist_ok=True)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UsageError, match=r"--model .*broken: its weights \(model.safetensors\) cannot be read "
                                         r"\(Error while deserializing header.*\): a file is truncated or corrupt; "
                                         r"write it again with the command that made it"):
        train(make_config(workdir, tmp_path / "out", model=broken, steps=1))


@needs_data
def test_a_run_stopped_by_sigterm_exits_143_and_its_summary_says_interrupted(workdir, tmp_path, monkeypatch, capsys):
    """So that ``mlkv train ... && mlkv eval ...`` does not evaluate an unfinished model."""
    def sigterm(step, _model):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr("mlkv.training.loop.TrainHooks", lambda: TrainHooks(after_backward=sigterm))
    cfg = make_config(workdir, tmp_path / "run", steps=3)
    assert cli_main(["train", *cli_flags(cfg)]) == 128 + signal.SIGTERM
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["interrupted"] and summary["stop_signal"] == signal.SIGTERM and summary["steps"] == 1
    assert not (tmp_path / "run" / "config.json").exists()  # no final model
    assert cli_main(["train", *cli_flags(cfg, resume=True)]) == 0


@needs_data
def test_the_progress_bar_shows_the_tokens_per_second_of_the_summary_including_the_last_step(workdir, tmp_path,
                                                                                          capsys):
    """The last step is read at once after the one before (for the final evaluation and checkpoint): its time is
    still its own, and the bar's last figure is the summary's."""
    summary = train(make_config(workdir, tmp_path / "run", steps=8, progress=True))
    shown = re.findall(r"tok/s=([\d,]+)", capsys.readouterr().err)
    assert len(shown) >= 2
    assert float(shown[-1].replace(",", "")) == pytest.approx(summary["tokens_per_s"], rel=0.05)
    seconds = summary["step_seconds"]
    assert seconds[-1] > 0.2 * statistics.median(seconds[3:-1])  # not ~0, as a step timed by its read would be


# ---- training -------------------------------------------------------------------------------------------------------
@needs_data
def test_loss_falls(trained):
    out, summary = trained
    losses = summary["losses"]
    assert len(losses) == 16 and summary["steps"] == 16 and not summary["interrupted"]
    assert losses[0] == pytest.approx(math.log(50304), abs=0.5)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.8
    evals = [r for r in read_metrics(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [8, 16]
    assert evals[1]["val_loss"] < evals[0]["val_loss"] < math.log(50304)
    assert evals[1]["val_ppl"] == pytest.approx(math.exp(evals[1]["val_loss"]))
    record = read_metrics(out)[0]
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(record)


@needs_data
def test_save_load_generate(trained):
    """The final model in --out loads with AutoModelForCausalLM, reproduces the logged val loss and generates."""
    out, summary = trained
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "MLKVForCausalLM"
    ckpt = AutoModelForCausalLM.from_pretrained(out / "checkpoint").eval()
    for a, b in zip(model.state_dict().values(), ckpt.state_dict().values()):
        assert torch.equal(a, b)

    from mlkv.data import prepare_data

    cache = Path(json.loads((out / "checkpoint" / "trainer_state.json").read_text())["config"]["cache_dir"])
    _, val, _ = prepare_data(str(VAL_FILE), TOKENIZER, cache, seq_len=64, max_documents=2, val_fraction=0.5,
                             progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for _, ids in zip(range(10), val.batches(4)):
            ce_sum, n = LossModel(model)(ids, evaluate=True)
            total, count = total + ce_sum.item(), count + n
    assert total / count == pytest.approx(summary["val_loss"], abs=1e-5)

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    prompt = torch.tensor([tokenizer.encode("It was a dark and stormy night").ids])
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, prompt.shape[1] + 8)
    assert torch.equal(generated[:, : prompt.shape[1]], prompt)
    assert isinstance(tokenizer.decode(generated[0].tolist()), str)


@needs_data
def test_the_final_model_records_how_it_was_trained_and_the_conversion_it_started_from(workdir, tmp_path, trained):
    """``mlkv_training.json`` beside the final model carries its conversion's record (which names the pretrained
    base and its training), so an export's model card can say how the model was made."""
    from mlkv.export.folder import export_checkpoint
    from mlkv.model.convert import convert_checkpoint

    converted = convert_checkpoint(trained[0], tmp_path / "converted", plan="1x1")
    out = tmp_path / "uptrained"
    train(make_config(workdir, out, model=converted, steps=2))
    record = json.loads((out / "mlkv_training.json").read_text())
    assert record["start"] == "checkpoint" and record["model"] == str(converted)
    assert record["objective"] == "lm" and record["steps"] == 2 and record["tokens"] == 2 * 4 * 64
    assert record["data"] == [str(VAL_FILE)] and record["validation"]["val_loss"] > 0
    assert record["conversion"]["init"] == "pairwise" and record["conversion"]["structure"] == "1x1"
    assert record["conversion"]["base"]["source"] == str(trained[0])
    assert record["conversion"]["base"]["training"]["start"] == "random"
    assert record["conversion"]["base"]["training"]["steps"] == 16
    card = (export_checkpoint(out, tmp_path / "portable") / "README.md").read_text()
    assert f"- base model: from `{trained[0]}`; itself trained by mlkv from a random initialisation: " \
           "objective **lm**, **4,096 tokens** in 16 steps" in card
    assert "- training (`mlkv train`, from the model above): objective **lm**, **512 tokens** in 2 steps" in card
    assert f"data: `{VAL_FILE}`" in card  # 1 producer x 1 head x head_dim 8, against 2 layers x 4 heads
    assert "- KV cache: **32 bytes per token** in fp16; the original (2x4): 256 bytes per token, 8.0x as many" in card


@pytest.mark.slow
@needs_data
def test_resume_is_exact(workdir, tmp_path):
    """SIGTERM in step 2, resume to --stop-after-steps 4, resume to the end: the same per-step losses (and
    weights) as one uninterrupted run. Attention dropout makes the RNG state matter; grad accumulation is on."""
    model = write_config(workdir, "dropout.json", attention_dropout=0.1)
    kw = dict(model=model, steps=6, micro_batch_size=2, grad_accum=2, save_every=3)
    full = train(make_config(workdir, tmp_path / "full", **kw))

    out = tmp_path / "parts"

    def sigterm(step, _model):  # a signal during step 2 stops after step 2
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(make_config(workdir, out, **kw), hooks=TrainHooks(after_backward=sigterm))
    assert first["interrupted"] and first["steps"] == 2 and first["stop_signal"] == signal.SIGTERM
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "model.safetensors").exists()  # the final model is written only when the run completes
    second = train(make_config(workdir, out, resume=True, stop_after_steps=4, **kw))
    assert second["start_step"] == 2 and second["steps"] == 4 and second["interrupted"]
    third = train(make_config(workdir, out, resume=True, **kw))
    assert third["start_step"] == 4 and third["steps"] == 6 and not third["interrupted"]

    expected, got = step_losses(tmp_path / "full"), step_losses(out)
    assert sorted(got) == list(range(1, 7)) == sorted(expected)
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-6, step
    assert full["losses"] == first["losses"] + second["losses"] + third["losses"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_data
def test_distill_self_teacher_zero_kl(workdir, tmp_path, trained):
    """Student == teacher (the trained checkpoint): KL is exactly 0, so loss = (1 - alpha) * lm."""
    summary = train(make_config(workdir, tmp_path / "distill", model=trained[0], steps=1, objective="distill",
                                teacher=str(trained[0]), distill_alpha=0.25, distill_temperature=2.0,
                                loss_chunk_tokens=64))
    record = read_metrics(tmp_path / "distill")[0]
    assert summary["origin"] == "checkpoint"
    assert abs(record["kl"]) <= 1e-6 and abs(record["hidden"]) <= 1e-6  # hidden-state term on by default, also 0
    assert record["loss"] == pytest.approx(0.75 * record["lm_loss"], abs=1e-6)


@pytest.mark.slow
@needs_data
def test_resume_keeps_the_loss_and_teacher_shape_is_checked_first(workdir, tmp_path, trained):
    """A distill run resumes only under the loss it started with (a checkpoint from before ``distill_hidden``
    existed counts as 0); a teacher of another depth fails before any data is read, naming the way out."""
    out = tmp_path / "kd"
    kd = dict(model=trained[0], steps=2, objective="distill", teacher=str(trained[0]), loss_chunk_tokens=64)
    train(make_config(workdir, out, stop_after_steps=1, distill_hidden=0.0, **kd))
    with pytest.raises(ResumeMismatchError, match=r"kd was started with other settings: --distill-hidden was 0.0, "
                                                  r"now 10.0\. Resume it with the settings it started with"):
        train(make_config(workdir, out, resume=True, **kd))
    state_file = out / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["run"], state["config"]["distill_hidden"]  # as written before either was recorded
    state_file.write_text(json.dumps(state))
    with pytest.raises(ResumeMismatchError, match=r"--distill-hidden was 0.0, now 10.0"):
        train(make_config(workdir, out, resume=True, **kd))
    assert train(make_config(workdir, out, resume=True, distill_hidden=0.0, **kd))["steps"] == 2

    deep = train(make_config(workdir, tmp_path / "deep", steps=1,
                             model=write_config(workdir, "deep.json", num_hidden_layers=3)))["out"]
    with pytest.raises(ValueError, match=r"teacher has 3 layers of 32, the student 2 of 32 \(use --distill-hidden 0"):
        train(make_config(workdir, tmp_path / "shape", **{**kd, "teacher": deep, "data": ["/nonexistent.jsonl"]}))


@needs_data
def test_nan_stops_and_keeps_checkpoint(workdir, tmp_path):
    def poison(step, model):  # a NaN gradient in step 3
        if step == 3:
            next(model.parameters()).grad.fill_(float("nan"))

    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="at step 3.*last good checkpoint \\(step 2\\)"):
        train(make_config(workdir, out, steps=5, save_every=2), hooks=TrainHooks(after_backward=poison))
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    kept = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    assert all(torch.isfinite(p).all() for p in kept.parameters())


# ---- several processes ----------------------------------------------------------------------------------------------
WORKER = """
import json, sys, torch, torch.distributed as dist
from mlkv.training import TrainConfig, TrainHooks, train

dist.init_process_group("gloo")
for name, extra in (("ddp", {}), ("fsdp", {"fsdp": True})):
    cfg = TrainConfig(**{**json.loads(sys.argv[1]), **extra, "out": sys.argv[2] + "/" + name})

    def grab(step, model, name=name):
        grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                 for n, p in model.named_parameters()}
        if dist.get_rank() == 0:
            torch.save(grads, sys.argv[2] + "/" + name + ".pt")

    summary = train(cfg, hooks=TrainHooks(after_backward=grab))
    if dist.get_rank() == 0:
        json.dump(summary["losses"], open(sys.argv[2] + "/" + name + ".json", "w"))
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@needs_data
def test_ddp_and_fsdp_gradients_equal_single_process(workdir, tmp_path):
    """2 processes (gloo) with 2 sequences each give the gradients and loss of 1 process with all 4."""
    cfg = make_config(workdir, tmp_path / "single", steps=1, micro_batch_size=2)
    captured = {}
    single = train(make_config(workdir, tmp_path / "single", steps=1, micro_batch_size=4),
                   hooks=TrainHooks(after_backward=lambda step, model: captured.update(
                       {n: p.grad.clone() for n, p in model.named_parameters()})))
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    config = {k: v for k, v in vars(cfg).items() if k != "out"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script), json.dumps(config), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for name in ("ddp", "fsdp"):
        grads = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert grads.keys() == captured.keys()
        for key in grads:
            torch.testing.assert_close(grads[key], captured[key], rtol=1e-5, atol=1e-7, msg=f"{name} {key}")
        loss = json.loads((tmp_path / f"{name}.json").read_text())
        assert loss[0] == pytest.approx(single["losses"][0], rel=1e-6)
