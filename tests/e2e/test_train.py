"""The trainer end to end on the demo corpus: logging, overfitting, exact resume, signals."""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmfm.config import ConfigError, load_config
from mmfm.testing import read_metrics
from mmfm.train import checkpoint as checkpoint_module
from mmfm.train.checkpoint import Checkpointer
from mmfm.train.command import build_trainer, train
from mmfm.train.trainer import NonFiniteLossError

from helpers import SignalAt

REPO = Path(__file__).resolve().parents[2]
# Runs whose loader is not under test read in-process: a loader worker is a fresh Python that
# imports torch and mmfm (5-15 s on 2 loaded cores). The runs that resume, stop on a signal or
# crash, and the demo recipe, keep the worker of the default tiny config, as users run.
NO_WORKER = "data.num_workers=0"


def final_weights(run_dir, cfg) -> dict:
    trainer = build_trainer(cfg)
    trainer.load(Checkpointer(Path(run_dir) / "checkpoints", 1).latest())
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


DEMO_STEPS = 20
"""The demo recipe's first steps, trained once for this module: all inside its warmup, so
the same steps as the 200-step run (the decay after warmup depends on train.steps)."""


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_cache):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    overrides = [f"train.steps={DEMO_STEPS}", f"train.run_dir={run_dir}"]
    overrides += [f"data.cache_dir={demo_cache}", "logging.progress=false", "eval.steps=1"]
    cfg = load_config(REPO / "launch/demo.yaml", overrides)
    assert cfg.optim.warmup_steps >= DEMO_STEPS  # else the 20 steps are not the demo's
    return cfg, train(cfg), run_dir


def test_demo_recipe_trains_and_reports(demo_run):
    cfg, result, run_dir = demo_run
    assert result.step == DEMO_STEPS
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, DEMO_STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "data/padding", "data/mix/data"):
        assert all(r[key] is not None for r in rows), key
    for key in ("loss/text", "loss/image", "loss/dna"):  # each modality shows up
        assert any(key in r for r in rows), key
    assert "val/loss" in rows[-1]  # its held-out split, evaluated after the last step
    assert load_config(run_dir / "config.yaml") == cfg  # the resolved config, reloadable
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / f"step_{DEMO_STEPS}" / "train_state.json").is_file()
    log = (run_dir / "train.log").read_text()
    assert "data: data (4 shards)" in log and "validation: eval (1 shards)" in log


def quick_start_demo_steps() -> dict[int, dict[str, float]]:
    """The step lines the quick start (docs/getting_started.md) shows as the demo's output."""
    page = (REPO / "docs" / "getting_started.md").read_text()
    section = page.split("## Quick start", 1)[1].split("\n## ")[0]
    line = r"step (\d+)/\d+ \| loss ([\d.]+) \| text ([\d.]+) \| image ([\d.]+) \| dna ([\d.]+)"
    keys = ("loss", "loss/text", "loss/image", "loss/dna")
    return {
        int(m[0]): dict(zip(keys, map(float, m[1:]), strict=True))
        for m in re.findall(line, section)
    }


def test_the_quick_start_shows_the_losses_the_demo_trains_to(demo_run):
    """The quick start's output at steps 1 and 20 is this code's: a change to the model, the
    data or the optimizer that moves the demo's losses fails here until the page is rerun."""
    shown = quick_start_demo_steps()
    assert {1, DEMO_STEPS} <= shown.keys(), shown
    rows = {r["step"]: r for r in read_metrics(demo_run[2])}
    for step in (1, DEMO_STEPS):
        for key, want in shown[step].items():
            printed = 1e-4 if key == "loss" else 1e-3  # 4 decimals shown, 3 per modality
            assert rows[step][key] == pytest.approx(want, abs=printed), (step, key)


def test_tiny_model_overfits_a_fixed_batch(tiny_config):
    cfg = tiny_config("optim.lr=3e-3", "optim.decay=constant", "optim.weight_decay=0", NO_WORKER)
    trainer = build_trainer(cfg)
    batch = trainer.loader.next_step()
    losses = [trainer.train_step(batch)["loss"] for _ in range(80)]
    assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])


def test_gradient_accumulation_matches_one_big_micro_batch(tiny_config):
    def losses(micro):
        trainer = build_trainer(tiny_config(f"train.micro_batch_size={micro}", NO_WORKER))
        return [trainer.train_step(trainer.loader.next_step())["loss"] for _ in range(3)]

    for a, b in zip(losses(4), losses(1), strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_resume_is_exact(tiny_config, tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = tiny_config("train.steps=8", f"train.run_dir={straight_dir}")
    train(straight)

    # 4 steps, interrupted by SIGUSR1, then resumed for the other 4 (past the 2 warmup steps).
    interrupted = tiny_config("train.steps=8", f"train.run_dir={resumed_dir}")
    trainer = build_trainer(interrupted)
    trainer.callbacks.append(SignalAt(4, signal.SIGUSR1))
    result = trainer.fit()
    assert (result.step, result.stopped_by) == (4, "SIGUSR1")
    resumed = tiny_config("train.steps=8", f"train.run_dir={resumed_dir}", "train.resume=auto")
    assert train(resumed).step == 8

    a, b = read_metrics(straight_dir), read_metrics(resumed_dir)
    assert [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x["step"], x["loss"], y["loss"])
    loading = tiny_config("train.steps=8", f"train.run_dir={tmp_path / 'load'}", NO_WORKER)
    wa, wb = final_weights(straight_dir, loading), final_weights(resumed_dir, loading)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_resume_none_refuses_a_run_dir_with_checkpoints(tiny_config):
    train(tiny_config("train.steps=2", NO_WORKER))
    with pytest.raises(ConfigError, match=r"set train\.resume=auto"):
        train(tiny_config("train.steps=4", NO_WORKER))


def test_crash_while_writing_leaves_no_pickable_checkpoint(tiny_config, monkeypatch, tmp_path):
    real_save, calls = checkpoint_module.dcp.save, []

    def crashing_save(state, checkpoint_id):
        calls.append(checkpoint_id)
        real_save(state, checkpoint_id=checkpoint_id)  # tensors written, state not yet
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash while writing a checkpoint")

    monkeypatch.setattr(checkpoint_module.dcp, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config("train.steps=6", "checkpoint.every=2"))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert (ckpt_dir / ".step_4.tmp").is_dir() and not (ckpt_dir / "step_4").exists()
    assert Checkpointer(ckpt_dir, 3).latest().name == "step_2"

    monkeypatch.setattr(checkpoint_module.dcp, "save", real_save)
    assert train(tiny_config("train.steps=6", "checkpoint.every=2", "train.resume=auto")).step == 6
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 7))
    assert not list(ckpt_dir.glob(".step_*"))


def _nan_on_steps(trainer, steps):
    def hook(module, args, output):
        return output * float("nan") if trainer.step + 1 in steps else output

    trainer.model.register_forward_hook(hook)


def test_nonfinite_step_is_skipped_and_counted(tiny_config):
    trainer = build_trainer(tiny_config("train.steps=4", "train.max_nonfinite_steps=2", NO_WORKER))
    _nan_on_steps(trainer, {2})
    trainer.train_step(trainer.loader.next_step())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    skipped = trainer.train_step(trainer.loader.next_step())
    assert skipped["nonfinite_steps"] == 1
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    after = trainer.train_step(trainer.loader.next_step())
    assert after["loss"] == after["loss"] and trainer.nonfinite_in_a_row == 0


def test_too_many_nonfinite_steps_stop_the_run(tiny_config):
    trainer = build_trainer(tiny_config("train.steps=10", "train.max_nonfinite_steps=3", NO_WORKER))
    _nan_on_steps(trainer, set(range(1, 11)))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .* lower optim\.lr"):
        trainer.fit()


def test_bf16_autocast_trains(tiny_config, tmp_path):
    # The same steps on the same rows in fp32 and under bf16 autocast: bf16 must learn (its
    # loss falls) and follow fp32 closely, but not bit for bit (that would mean no autocast).
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        run = [f"train.precision={precision}", f"train.run_dir={tmp_path / precision}"]
        trainer = build_trainer(tiny_config(*run, "optim.lr=3e-3", NO_WORKER))
        steps = [trainer.train_step(trainer.loader.next_step()) for _ in range(10)]
        trainer.loader.close()
        losses[precision] = [step["loss"] for step in steps]
    fp32, bf16 = losses["fp32"], losses["bf16"]
    assert bf16 != fp32
    assert max(abs(a - b) for a, b in zip(fp32, bf16, strict=True)) < 0.01 * fp32[0]
    assert bf16[-1] < bf16[0] - 1.0, bf16  # 5.83 -> 4.10 when this was written


def test_sigterm_mid_run_checkpoints_and_exits_cleanly(tmp_path, tiny_overrides):
    run_dir = tmp_path / "sig"
    cmd = [sys.executable, "-m", "mmfm", "train", str(REPO / "launch/demo.yaml"), *tiny_overrides]
    cmd += ["train.steps=100000", f"train.run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err
    last = read_metrics(run_dir)[-1]["step"]
    latest = Checkpointer(run_dir / "checkpoints", 3).latest()
    assert latest.name == f"step_{last}"
    assert not list((run_dir / "checkpoints").glob(".step_*"))


def test_vocabulary_travels_with_the_run_and_checkpoints(tiny_config, tmp_path):
    from mmfm.tokenization.vocab import Vocab

    vocab = Vocab.build(300, codebooks=[("image", 16)])
    vocab.save(tmp_path / "v.json")
    with pytest.raises(ConfigError, match=r"model.vocab_size \(320\) is smaller"):
        train(tiny_config(f"data.vocab={tmp_path / 'v.json'}", "model.vocab_size=320", NO_WORKER))
    vocab_run = [f"data.vocab={tmp_path / 'v.json'}", "model.vocab_size=384", NO_WORKER]
    cfg = tiny_config(*vocab_run, "train.steps=2")
    train(cfg)
    run = Path(cfg.train.run_dir)
    assert Vocab.load(run / "vocab.json") == vocab
    assert Vocab.load(run / "checkpoints" / "step_2" / "vocab.json") == vocab
