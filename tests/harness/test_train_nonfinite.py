"""Non-finite losses: they stop a run without a GradScaler, and are skipped and counted under fp16's GradScaler."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sharpness.cli.main import main
from sharpness.harness.config import load_config
from sharpness.harness.train import Trainer, TrainingDiverged

FAST = ["epochs=2", "batch_size=64", "model_kwargs={width: 8}", "device=cpu"]
STEPS = 1297 // 64


class Poisoned(Trainer):
    """Multiplies the loss of the chosen global steps (1-based) by inf, and records what each step reported."""

    def __init__(self, *args, poison: set[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.poison, self.steps, self.record = poison, 0, []

    def _step(self, images, labels, acc):
        self.steps += 1
        super()._step(images, labels, acc)

    def _loss(self, x, y):
        loss, logits = super()._loss(x, y)
        return (loss * math.inf if self.steps in self.poison else loss), logits

    def _after_step(self, loss, logits, labels, acc, skipped):
        correct = int((logits.argmax(1) == labels).sum())
        self.record.append((loss.detach().float().clone(), correct, skipped is not None and bool(skipped)))
        super()._after_step(loss, logits, labels, acc, skipped)


@pytest.mark.parametrize("method", ["sam", "sgd"])
def test_fp16_skipped_steps_stay_out_of_the_epoch_means_and_are_counted(tmp_path, method):
    cfg = load_config("demo-digits", [*FAST, "precision=fp16", f"method={method}"])
    poison = {3, 7, STEPS + 5}
    trainer = Poisoned(cfg, tmp_path / "run", progress=False, poison=poison)
    summary = trainer.run()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = {i + 1 for i, (_, _, s) in enumerate(trainer.record) if s}
    assert poison <= skipped
    for epoch, line in enumerate(lines):
        steps = trainer.record[epoch * STEPS : (epoch + 1) * STEPS]
        loss_sum = torch.zeros(())  # the trainer's float32 sum, in its order
        correct = count = 0
        for loss, right, was_skipped in steps:
            if not was_skipped:
                loss_sum += loss * 64
                correct, count = correct + right, count + 64
        assert line["skipped_steps"] == sum(s for _, _, s in steps)
        assert line["train_loss"] == float(loss_sum) / count and math.isfinite(line["train_loss"])
        assert line["train_error"] == 100.0 * (1 - correct / count)
    assert summary["metrics"]["skipped_steps"] == len(skipped)


def test_fp16_stops_only_when_every_step_of_an_epoch_was_skipped(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "precision=fp16"])
    trainer = Poisoned(cfg, tmp_path / "run", progress=False, poison=set(range(1, STEPS + 1)))
    with pytest.raises(TrainingDiverged) as err:
        trainer.run()
    message = str(err.value)
    assert message == (
        f"epoch 1: GradScaler skipped all {STEPS} steps (inf/NaN gradients in every one); lower lr (now 0.05) or "
        "rho (now 0.4), or set grad_clip"
    )
    assert "fp16" not in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_without_gradscaler_one_skipped_step_stops_the_run_at_the_end_of_its_epoch(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "precision=bf16"])
    trainer = Poisoned(cfg, tmp_path / "run", progress=False, poison={STEPS + 4})
    with pytest.raises(TrainingDiverged) as err:
        trainer.run()
    assert str(err.value) == (
        f"epoch 2: 1 of {STEPS} steps had a non-finite loss or gradient and SAM skipped them (precision bf16, "
        "no GradScaler); lower lr (now 0.05) or rho (now 0.4), or set grad_clip"
    )
    assert trainer.steps == 2 * STEPS  # the epoch ran to its end: the counter is read once per epoch
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_huge_rho_is_a_clear_one_line_divergence(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "demo-digits",
            "--out",
            str(out),
            "--no-progress",
            *[a for s in FAST for a in ("--set", s)],
            "--set",
            "rho=1e30",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sharpness: training diverged: epoch 1: ") and "\n" not in err
    assert f"of {STEPS} steps had a non-finite loss or gradient and SAM skipped them (precision fp32" in err
    assert "rho (now 1e+30)" in err
    assert not (out / "summary.json").exists()


def test_a_nan_loss_of_plain_sgd_stops_the_run(tmp_path):
    cfg = load_config(
        "demo-digits", [*FAST, "method=sgd", "model=mlp", "model_kwargs={}", "lr=1.0e+12", "weight_decay=0"]
    )
    with pytest.raises(TrainingDiverged, match=r"^epoch 1: training loss is nan; lower lr \(now 1e\+12\), or set "):
        Trainer(cfg, tmp_path / "run", progress=False).run()
