"""The training loop of the paper's experiments: data and augmentation on the device, SAM through its public API.

A run lives in a directory: ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per epoch, flushed),
``checkpoint.pt`` (atomic; resumable also mid-epoch after SIGTERM), ``summary.json``, ``model.pt`` and
``curves.png``. Randomness is derived from (seed, epoch) at every epoch start and saved in mid-epoch
checkpoints, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from tqdm.auto import tqdm

from sharpness import SAM
from sharpness.harness.augment import build_augmentation
from sharpness.harness.build import build_optimizer, build_schedule, method_label, resolve_device
from sharpness.harness.checkpoint import append_jsonl, load_checkpoint, save_checkpoint, write_json
from sharpness.harness.config import TrainConfig
from sharpness.harness.data import ArrayDataset, load_dataset, noisy_labels, train_val_split
from sharpness.harness.loader import DeviceData
from sharpness.harness.models import build_model

__all__ = ["RunDirExists", "TrainingDiverged", "Interrupted", "PreparedData", "prepare_data", "train", "Trainer"]


# Keys a resumed run may change: where the data and the computation are, not what is computed.
_MAY_CHANGE = frozenset({"device", "data_dir"})


class RunDirExists(FileExistsError):
    """The run directory already holds a run and neither resuming nor a new directory was asked for."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGTERM arrived; a checkpoint was saved and the run can be resumed."""


@dataclass
class PreparedData:
    dataset: ArrayDataset
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    clean_train_labels: np.ndarray
    eval_split: str


def prepare_data(config: TrainConfig, train_labels: np.ndarray | None = None) -> PreparedData:
    """The training and evaluation arrays of a config: subset, validation split, label noise (test stays clean)."""
    ds = load_dataset(config.dataset, config.data_dir)
    x, y = ds.x_train, ds.y_train
    if config.train_subset is not None:
        x, y = x[: config.train_subset], y[: config.train_subset]
    eval_x, eval_y, split = ds.x_test, ds.y_test, "test"
    if config.val_fraction > 0:
        train_idx, val_idx = train_val_split(len(y), config.val_fraction, config.seed)
        if config.eval_on == "val":
            eval_x, eval_y, split = x[val_idx], y[val_idx], "val"
        x, y = x[train_idx], y[train_idx]
    clean = y
    if config.label_noise > 0:
        y = noisy_labels(y, ds.num_classes, config.label_noise, seed=config.seed, kind=config.noise_kind)
    if train_labels is not None:
        y = train_labels
    return PreparedData(ds, x, y, eval_x, eval_y, clean, split)


def _seed_everything(seed: int, epoch: int) -> None:
    torch.manual_seed(seed * 1_000_003 + 7919 * epoch + 1)


class Trainer:
    """One run of a :class:`TrainConfig` in ``run_dir``."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        progress: bool | None = None,
        train_labels: np.ndarray | None = None,
        method_suffix: str = "",
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.device = resolve_device(config.device)
        self.method = method_label(config) + method_suffix
        self._train_labels_override = train_labels
        self._stop = False

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg, device = self.config, self.device
        torch.manual_seed(cfg.seed)
        self.data = prepare_data(cfg, self._train_labels_override)
        ds = self.data.dataset
        self.train_set = DeviceData(self.data.train_images, self.data.train_labels, device)
        self.eval_set = DeviceData(self.data.eval_images, self.data.eval_labels, device)
        if len(self.train_set) < cfg.batch_size:
            raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(self.train_set)} training examples")
        self.augment = build_augmentation(
            cfg.augment,
            ds.mean,
            ds.std,
            image_size=ds.x_train.shape[1],
            policy=cfg.autoaugment_policy,
            cutout_size=cfg.cutout_size,
        ).to(device)
        self.model = build_model(
            cfg.model,
            ds.num_classes,
            in_channels=ds.x_train.shape[3],
            image_size=ds.x_train.shape[1],
            **cfg.model_kwargs,
        )
        self.model.to(device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = build_optimizer(cfg, self.model)
        self.steps_per_epoch = self.train_set.num_batches(cfg.batch_size, drop_last=True)
        self.schedule = build_schedule(cfg, self.optimizer, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.aug_gen = torch.Generator(device=device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: every batch has batch_size examples

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _inputs(self, images: Tensor, train: bool) -> Tensor:
        x = self.augment(images, generator=self.aug_gen) if train else self.augment.normalize(images)
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    # ------------------------------------------------------------------ one step
    def _loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast():
            logits = self.forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing)
        return loss, logits

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _step(self, images: Tensor, labels: Tensor, acc: dict[str, Tensor]) -> None:
        """One update. SAM runs in its two-pass form, which GradScaler and clipping also go through."""
        opt, cfg = self.optimizer, self.config
        x = self._inputs(images, train=True)
        if isinstance(opt, SAM) and cfg.second_order:  # needs the closure form (config forbids fp16 here)
            first: list[tuple[Tensor, Tensor]] = []

            def closure() -> Tensor:
                out = self._loss(x, labels)
                first.append(out)
                out[0].backward(create_graph=opt.create_graph)
                return out[0]

            opt.step(closure)
            self._after_step(*first[0], labels, acc)
            return
        loss, logits = self._loss(x, labels)
        self._backward(loss)
        if isinstance(opt, SAM):
            for _ in range(cfg.ascent_steps):
                opt.first_step(zero_grad=True)
                self._backward(self._loss(x, labels)[0])
        elif cfg.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip, foreach=True)
        if self.scaler is not None:
            scale_before = self.scaler._scale.clone() if not isinstance(opt, SAM) else None
            self.scaler.step(opt)
            self.scaler.update()
            if scale_before is not None:  # a plain optimizer's skipped step shows as a backed-off scale
                acc["skipped"] += (self.scaler._scale < scale_before).long()
        else:
            opt.step()
        self._after_step(loss, logits, labels, acc)

    def _after_step(self, loss: Tensor, logits: Tensor, labels: Tensor, acc: dict[str, Tensor]) -> None:
        opt = self.optimizer
        if isinstance(opt, SAM) and opt.last_step_skipped is not None:
            acc["skipped"] += opt.last_step_skipped.long()
        opt.zero_grad(set_to_none=True)
        self.schedule.step()
        n = labels.numel()
        acc["loss"] += loss.detach().float() * n
        acc["correct"] += (logits.argmax(1) == labels).sum()
        acc["count"] += n

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data: DeviceData | None = None) -> dict[str, float]:
        data = data or self.eval_set
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for images, labels in data.in_order(self.config.eval_batch_size):
            with self._autocast():
                logits = self.forward(self._inputs(images, train=False)).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(1) == labels).sum()
        self.model.train()
        n = len(data)
        return {"loss": loss_sum.item() / n, "error": 100.0 * (1 - correct.item() / n)}

    @torch.no_grad()
    def predict_train_labels(self) -> np.ndarray:
        self.model.eval()
        preds = [
            self.forward(self._inputs(images, train=False)).argmax(1)
            for images, _ in self.train_set.in_order(self.config.eval_batch_size)
        ]
        self.model.train()
        return torch.cat(preds).cpu().numpy()

    # ------------------------------------------------------------------ state
    def _state(self, epoch: int, step: int, acc: dict[str, Tensor]) -> dict[str, Any]:
        state = {
            "epoch": epoch,
            "step_in_epoch": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_aug": self.aug_gen.get_state(),
            "accumulators": {k: v.detach().cpu() for k, v in acc.items()},
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _load_state(self, state: dict[str, Any]) -> tuple[int, int, dict[str, Tensor]]:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng_cpu"])
        self.aug_gen.set_state(state["rng_aug"])
        if "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        acc = {k: v.to(self.device) for k, v in state["accumulators"].items()}
        return state["epoch"], state["step_in_epoch"], acc

    def _prepare_run_dir(self, resume: bool) -> bool:
        """Create or check the run directory; True when there is a checkpoint to continue from."""
        config_path = self.run_dir / "config.yaml"
        if resume and config_path.is_file():
            saved = yaml.safe_load(config_path.read_text())
            mine = self.config.to_dict()
            diff = sorted(k for k in saved.keys() | mine.keys() if k not in _MAY_CHANGE and saved.get(k) != mine.get(k))
            if diff:
                raise ValueError(f"--resume: the config differs from the run's config.yaml in {', '.join(diff)}")
            if (self.run_dir / "checkpoint.pt").is_file():
                return True
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)  # killed before its first checkpoint
            return False
        if resume:
            raise FileNotFoundError(f"--resume: {self.run_dir} holds no run (no config.yaml)")
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise RunDirExists(
                f"run directory {self.run_dir} is not empty; pass --resume to continue it, or choose another --out"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        if self._train_labels_override is not None:
            np.save(self.run_dir / "train_labels.npy", self._train_labels_override)
        return False

    def _truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric lines of epochs the checkpoint does not cover (a kill between the two writes)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return

        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= last_epoch]
        path.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ the run
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train to the end (or until SIGTERM, which raises :class:`Interrupted` after saving)."""
        cfg = self.config
        resume = self._prepare_run_dir(resume)
        self._setup()
        zero = {
            "loss": torch.zeros((), device=self.device),
            "correct": torch.zeros((), dtype=torch.int64, device=self.device),
            "count": torch.zeros((), dtype=torch.int64, device=self.device),
            "skipped": torch.zeros((), dtype=torch.int64, device=self.device),
        }
        start_epoch, start_step, acc = 0, 0, {k: v.clone() for k, v in zero.items()}
        if resume:
            start_epoch, start_step, acc = self._load_state(load_checkpoint(self.run_dir / "checkpoint.pt"))
            self._truncate_metrics(start_epoch)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        started = time.perf_counter()
        try:
            epochs = tqdm(range(start_epoch, cfg.epochs), disable=not self.progress, desc=cfg.name, unit="epoch")
            for epoch in epochs:
                if start_step == 0:
                    _seed_everything(cfg.seed, epoch)
                    self.aug_gen.manual_seed(cfg.seed * 1_000_003 + epoch)
                epoch_start = time.perf_counter()
                self.model.train()
                for i, (images, labels) in enumerate(
                    self.train_set.shuffled(cfg.batch_size, cfg.seed, epoch, start_step), start=start_step
                ):
                    self._step(images, labels, acc)
                    if self._stop:
                        save_checkpoint(self.run_dir / "checkpoint.pt", self._state(epoch, i + 1, acc))
                        raise Interrupted(
                            f"SIGTERM: checkpoint saved at epoch {epoch}, step {i + 1}; resume with --resume"
                        )
                start_step = 0
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the epoch's time includes its queued kernels
                record = self._end_epoch(epoch, acc, time.perf_counter() - epoch_start)
                epochs.set_postfix(train_loss=f"{record['train_loss']:.3f}", test_error=f"{record['test_error']:.2f}")
                acc = {k: v.clone() for k, v in zero.items()}
                save_checkpoint(self.run_dir / "checkpoint.pt", self._state(epoch + 1, 0, acc))
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return self._finish(time.perf_counter() - started)

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True

    def _end_epoch(self, epoch: int, acc: dict[str, Tensor], seconds: float) -> dict[str, Any]:
        count = max(1, int(acc["count"]))
        train_loss = float(acc["loss"]) / count
        if not np.isfinite(train_loss):
            raise TrainingDiverged(
                f"epoch {epoch + 1}: training loss is {train_loss}; lower lr (now {self.config.lr}) or rho, "
                "or use precision: fp16 with GradScaler skipping"
            )
        evaluation = self.evaluate()
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_error": 100.0 * (1 - int(acc["correct"]) / count),
            f"{self.data.eval_split}_loss": evaluation["loss"],
            f"{self.data.eval_split}_error": evaluation["error"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "skipped_steps": int(acc["skipped"]),
        }
        if self.data.eval_split != "test":
            record.update(test_loss=evaluation["loss"], test_error=evaluation["error"])
        append_jsonl(self.run_dir / "metrics.jsonl", record)
        return record

    def _finish(self, seconds: float) -> dict[str, Any]:

        lines = [json.loads(x) for x in (self.run_dir / "metrics.jsonl").read_text().splitlines() if x]
        last = lines[-1]
        split = self.data.eval_split
        metrics = {
            f"{split}_error": last[f"{split}_error"],
            f"{split}_loss": last[f"{split}_loss"],
            "test_error": last["test_error"],
            "test_loss": last["test_loss"],
            "train_error": last["train_error"],
            "train_loss": last["train_loss"],
            "skipped_steps": sum(x["skipped_steps"] for x in lines),
        }
        if self.config.label_noise > 0:
            predicted = self.predict_train_labels()
            noisy = self.data.train_labels != self.data.clean_train_labels
            metrics["noisy_labels_fitted"] = 100.0 * float(np.mean(predicted[noisy] == self.data.train_labels[noisy]))
        summary = {
            "experiment": self.config.name,
            "method": self.method,
            "seed": self.config.seed,
            "metrics": metrics,
            "epochs": self.config.epochs,
            "seconds": sum(x["seconds"] for x in lines),
            "device": str(self.device)
            + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else ""),
            "config": self.config.to_dict(),
        }
        torch.save(self.model.state_dict(), self.run_dir / "model.pt")
        write_json(self.run_dir / "summary.json", summary)
        try:
            from sharpness.harness.report import plot_curves

            plot_curves(self.run_dir)
        except Exception as exc:  # a plot must never lose a finished run
            print(f"warning: could not plot curves for {self.run_dir}: {exc}", file=sys.stderr)
        return summary


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(
    config: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool | None = None
) -> list[dict[str, Any]]:
    """Run a config; with ``bootstrap``, then retrain from scratch on the first model's predicted labels.

    Returns the summaries written (one, or two with bootstrapping: the second in ``run_dir/bootstrap``, which
    also keeps the labels it was trained on in ``train_labels.npy``).
    """
    run_dir = Path(run_dir)
    first = Trainer(config, run_dir, progress=progress)
    summaries = [_finished(first, resume) or first.run(resume=resume)]
    if not config.bootstrap:
        return summaries
    bootstrap_dir = run_dir / "bootstrap"
    labels_file = bootstrap_dir / "train_labels.npy"
    if labels_file.is_file():
        labels = np.load(labels_file)
    else:
        if "model" not in first.__dict__:
            first._setup()
            first.model.load_state_dict(torch.load(run_dir / "model.pt", map_location=first.device, weights_only=True))
        labels = first.predict_train_labels()
    second = Trainer(config, bootstrap_dir, progress=progress, train_labels=labels, method_suffix="+bootstrap")
    resume_second = resume and (bootstrap_dir / "config.yaml").is_file()
    summaries.append(_finished(second, resume_second) or second.run(resume=resume_second))
    return summaries


def _finished(trainer: Trainer, resume: bool) -> dict[str, Any] | None:
    """The summary of a finished run being resumed (after checking its config), else None."""
    summary = trainer.run_dir / "summary.json"
    if not (resume and summary.is_file()):
        return None
    trainer._prepare_run_dir(resume=True)
    return json.loads(summary.read_text())
