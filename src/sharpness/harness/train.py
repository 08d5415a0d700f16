"""The training loop of the paper's experiments: data and augmentation on the device, SAM through its public API.

A run lives in a directory: ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per epoch, flushed),
``checkpoint.pt`` (atomic; resumable also mid-epoch after SIGTERM), ``summary.json``, ``model.pt`` and
``curves.png``. Everything a run needs (data, model, augmentation) is built and checked before the directory
is written, so a failed start leaves nothing behind. Randomness is derived from (seed, epoch) at every epoch
start and saved in mid-epoch checkpoints, so a resumed run ends with the same weights as an uninterrupted one.

Non-finite values (the spec: a NaN/inf loss stops the run with a clear message, or is skipped under
GradScaler, counted and reported): without a GradScaler, a step that SAM skips for a non-finite gradient, or a
non-finite loss, stops the run with :class:`TrainingDiverged` at the end of its epoch; under fp16's GradScaler
skipped steps are left out of the epoch's loss and error, counted in ``skipped_steps``, and only an epoch whose
every step was skipped stops the run. The counters stay on the device and are read once per epoch.

``dataset: imagefolder`` streams its batches from disk through loader workers (:mod:`sharpness.harness.streaming`)
instead of holding them on the device, with the same interface and the same (seed, epoch) rules; ``init_from``,
``freeze`` and ``freeze_bn_stats`` finetune a pretrained model (:mod:`sharpness.harness.finetune`, the SAM
paper's Table 3), and ``train_steps`` sets the run's length in optimizer steps.

Under ``torchrun`` the run is data-parallel (:mod:`sharpness.harness.distributed`, docs/distributed.md): each rank
trains on its share of every global batch, rank 0 alone writes the run directory, and the epoch's counters are
reduced over the ranks before anything is decided from them.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from sharpness import ESAM, SAM
from sharpness.harness import distributed
from sharpness.harness.augment import build_augmentation
from sharpness.harness.build import build_optimizer, build_schedule, method_label
from sharpness.harness.config import IMAGEFOLDER, TrainConfig
from sharpness.harness.finetune import freeze, freeze_bn_stats, load_pretrained
from sharpness.harness.loader import DeviceData
from sharpness.harness.models import build_model
from sharpness.harness.prepare import PreparedData, input_statistics, prepare_data
from sharpness.harness.rundir import RunDir, RunDirBusy, RunDirExists
from sharpness.harness.seeds import epoch_seed
from sharpness.harness.streaming import ImageFolderData, StreamingData, prepare_imagefolder

__all__ = [
    "RunDirExists",
    "RunDirBusy",
    "TrainingDiverged",
    "Interrupted",
    "PreparedData",
    "prepare_data",
    "train",
    "Trainer",
]


class TrainingDiverged(RuntimeError):
    """The training loss or gradients became NaN or infinite (see the module docstring for when this stops a run)."""


class Interrupted(Exception):
    """SIGTERM or SIGINT (Ctrl-C) arrived; a checkpoint was saved and the run can be resumed."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _seed_epoch(seed: int, epoch: int, aug_gen: torch.Generator, rank: int = 0) -> None:
    """Seed torch's global generator (dropout, shake) and the augmentation's for ``epoch`` on data-parallel rank
    ``rank``; the batch order has its own stream (:func:`sharpness.harness.loader.epoch_permutation`)."""
    torch.manual_seed(epoch_seed(seed, epoch, "torch", rank))
    aug_gen.manual_seed(epoch_seed(seed, epoch, "augment", rank))


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
        self.world = distributed.join(config.device)  # torchrun's process group, if any
        self.files: RunDir | distributed.SharedRunDir = distributed.shared_run_dir(self.run_dir, self.world, config)
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.world.is_main
        self.device = self.world.device
        self.method = method_label(config) + method_suffix
        self._train_labels_override = train_labels
        self._stop = False
        self._signal = signal.SIGTERM  # the stop signal that arrived

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg, device = self.config, self.device
        distributed.check_config(cfg, self.world)
        torch.manual_seed(cfg.seed)
        shard = (self.world.rank, self.world.size)
        self.data: PreparedData | ImageFolderData
        if cfg.dataset == IMAGEFOLDER:  # decoded by loader workers: 3 channels, cropped to image_size
            self.data = prepare_imagefolder(cfg, device, shard)
            num_classes, in_channels, image_size = self.data.num_classes, 3, cfg.image_size
            mean, std = self.data.mean, self.data.std
        else:
            self.data = prepare_data(cfg, self._train_labels_override)
            ds = self.data.dataset
            if len(self.data.train_labels) < cfg.batch_size:
                raise ValueError(
                    f"batch_size {cfg.batch_size} exceeds the {len(self.data.train_labels)} training examples"
                )
            num_classes, in_channels, image_size = ds.num_classes, ds.x_train.shape[3], ds.x_train.shape[1]
            mean, std = input_statistics(cfg, ds)
        self.augment = build_augmentation(
            cfg.augment,
            mean,
            std,
            image_size=image_size,
            policy=cfg.autoaugment_policy,
            cutout_size=cfg.cutout_size,
            flip=cfg.hflip,
            output_size=cfg.upscale_to,
        ).to(device)
        self.model = build_model(
            cfg.model, num_classes, in_channels=in_channels, image_size=cfg.upscale_to or image_size, **cfg.model_kwargs
        )
        self.finetuned = self._finetune(self.model)
        self.model.to(device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.train_set: DeviceData | StreamingData
        self.eval_sets: dict[str, DeviceData] | dict[str, StreamingData]
        if isinstance(self.data, ImageFolderData):
            self.train_set, self.eval_sets = self.data.train_set, self.data.eval_sets
        else:
            self.train_set = DeviceData(self.data.train_images, self.data.train_labels, device, shard)
            self.eval_sets = {name: DeviceData(x, y, device) for name, (x, y) in self.data.splits.items()}
        self.wrapped = distributed.wrap_model(self.model, self.world, cfg)  # DDP, FSDP or the model itself
        self.forward = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        # Evaluation bypasses DDP, whose forward broadcasts buffers: ranks evaluate different batches.
        unwrapped = self.wrapped is self.model
        self.eval_forward = self.forward if unwrapped else torch.compile(self.model) if cfg.compile else self.model
        # per_replica: each rank's perturbation comes from its own gradient (DDP's no_sync); FSDP has no such pass.
        self.per_replica = not unwrapped and cfg.perturbation == "per_replica" and cfg.distributed == "ddp"
        self.steps_per_epoch = self.train_set.num_batches(cfg.batch_size, drop_last=True)
        # train_steps (Table 3's rows are given in steps) sets the length; the last epoch may be partial
        self.total_steps = cfg.train_steps or cfg.epochs * self.steps_per_epoch
        self.epochs = -(-self.total_steps // self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self.optimizer = build_optimizer(cfg, self.model, self.total_steps, self.scaler)
        self.schedule = build_schedule(cfg, self.optimizer, self.steps_per_epoch)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.aug_gen = torch.Generator(device=device)

    def _finetune(self, model: nn.Module) -> dict[str, Any] | None:
        """The SAM paper's finetuning (Table 3, Appendix C.2), before the model moves to its device: the weights of
        ``init_from`` except a classifier of another class count, which keeps the fresh initialisation of this
        run's seed; ``freeze``'s parameters left out of training; with ``freeze_bn_stats`` every BatchNorm layer
        normalising with its (pretrained) running statistics. Returns what was done, for the summary."""
        cfg = self.config
        done: dict[str, Any] = {}
        if cfg.init_from:
            loaded = load_pretrained(model, Path(cfg.init_from).expanduser(), head=cfg.head)
            done.update(
                init_from=cfg.init_from, loaded=loaded.loaded, head=loaded.head, head_replaced=loaded.head_replaced
            )
            if self.world.is_main:
                print(f"init_from {cfg.init_from}: {loaded.summary()}", file=sys.stderr)
        if cfg.freeze:
            done["frozen"] = freeze(model, cfg.freeze)
        if cfg.freeze_bn_stats:
            done["bn_stats_frozen"] = len(freeze_bn_stats(model))
        return done or None

    def _epoch_steps(self, epoch: int) -> int:
        """Optimizer steps in ``epoch``: all its batches, but in the last epoch of a ``train_steps`` run the rest."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's training batches of ``epoch`` from step ``start`` on, up to the epoch's last step."""
        cfg = self.config
        return itertools.islice(
            self.train_set.shuffled(cfg.batch_size, cfg.seed, epoch, start), self._epoch_steps(epoch) - start
        )

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _inputs(self, images: Tensor, train: bool) -> Tensor:
        x = self.augment(images, generator=self.aug_gen) if train else self.augment.normalize(images)
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    # ------------------------------------------------------------------ one step
    def _loss(self, x: Tensor, y: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor]:
        with self._autocast():
            logits = self.forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing, reduction=reduction)
        return loss, logits

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _local(self, enabled: bool = True):
        """Under ``perturbation: per_replica``, a pass whose gradient stays on this rank (``no_sync``)."""
        return distributed.no_sync(self.wrapped, enabled and self.per_replica)

    def _step(self, images: Tensor, labels: Tensor, acc: dict[str, Tensor]) -> None:
        """One update. SAM and its variants run in their manual form (:meth:`_sam_passes`), which GradScaler and
        clipping also go through."""
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
            acc["passes"] += 3
            self._after_step(*first[0], labels, acc, opt.last_step_skipped)
            return
        if isinstance(opt, SAM):
            loss, logits, passes = self._sam_passes(x, labels)
            acc["passes"] += passes
        else:
            acc["passes"] += 1
            loss, logits = self._loss(x, labels)
            self._backward(loss)
            if cfg.grad_clip is not None:
                if self.scaler is not None:
                    self.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip, foreach=True)
        skipped = None
        if self.scaler is not None:
            scale_before = self.scaler._scale.clone() if not isinstance(opt, SAM) else None
            self.scaler.step(opt)
            self.scaler.update()
            if scale_before is not None:  # a plain optimizer's skipped step shows as a backed-off scale
                skipped = self.scaler._scale < scale_before
        else:
            opt.step()
        if isinstance(opt, SAM):
            skipped = opt.last_step_skipped
        self._after_step(loss, logits, labels, acc, skipped)

    def _sam_passes(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int]:
        """The passes of SAM or a variant, leaving the step to ``opt.step()`` or ``scaler.step(opt)``.

        Returns the loss and logits the metrics report (the clean pass's; for MSAM and the random direction, whose
        only pass is at the perturbed point, that pass's) and the number of forward-backward passes.

        - SAM with ``m_sharpness`` (Foret et al., §4.1) splits the batch into subsets of m examples, each perturbed
          by its own gradient: per subset its clean backward, then ``ascent_steps`` times ``first_step`` and a
          perturbed backward, each of the subset's mean loss weighted by its share of the batch, with
          ``opt.next_subset()`` between subsets. Without it the same code runs once on the whole batch.
        - A variant's ``first_step()`` may answer that this step does not ascend (LookSAM, IntervalSAM, ...):
          then the clean pass is the only one.
        - MSAM and the random direction perturb before their one pass; ESAM's perturbed pass runs on the examples
          that :meth:`sharpness.ESAM.select` picks.

        Data-parallel with ``perturbation: per_replica``, every pass but the step's last runs under ``no_sync`` (each
        rank's perturbation from its own gradient, the last pass all-reducing the sum of all): the step's only
        pass (MSAM's, a step that ``next_step_ascends`` says does not ascend) is all-reduced as any optimizer's.
        """
        opt, cfg = self.optimizer, self.config
        if opt.perturbs_before_pass:
            opt.first_step()
            loss, logits = self._loss(x, labels)
            self._backward(loss)
            return loss, logits, 1
        if isinstance(opt, ESAM):
            return self._esam_passes(x, labels)
        n = labels.numel()
        m = cfg.m_sharpness or n
        subsets = list(zip(x.split(m), labels.split(m), strict=True)) if m < n else [(x, labels)]
        local = opt.next_step_ascends is not False  # None (AESAM): it averages a step that does not ascend itself
        losses, logits, passes = [], [], 0
        for i, (xs, ys) in enumerate(subsets):
            if i:
                opt.next_subset()
            share = ys.numel() / n if len(subsets) > 1 else None
            with self._local(local):
                loss, out = self._loss(xs, ys)
                self._backward(loss if share is None else loss * share)
            passes += 1
            for k in range(cfg.ascent_steps):
                if not opt.first_step(zero_grad=True):
                    break
                last = i == len(subsets) - 1 and k == cfg.ascent_steps - 1
                with self._local(not last):
                    perturbed = self._loss(xs, ys)[0]
                    self._backward(perturbed if share is None else perturbed * share)
                passes += 1
            losses.append(loss if share is None else loss.detach() * share)
            logits.append(out)
        if len(subsets) == 1:
            return losses[0], logits[0], passes
        return torch.stack(losses).sum(), torch.cat(logits), passes

    def _esam_passes(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int]:
        """ESAM: the clean pass, a forward at w + eps without backward, and the selected examples' pass."""
        opt = self.optimizer
        with self._local():
            losses, logits = self._loss(x, labels, reduction="none")
            self._backward(losses.mean())
        opt.first_step()
        with torch.no_grad():
            sharper = self._loss(x, labels, reduction="none")[0]
        keep = opt.select(losses.detach(), sharper)
        self._backward(self._loss(x[keep], labels[keep])[0])
        return losses.detach().mean(), logits, 2

    def zero_accumulators(self) -> dict[str, Tensor]:
        """An epoch's device counters: loss sum, correct predictions and examples of the kept steps, skipped steps."""
        return {
            "loss": torch.zeros((), device=self.device),
            "correct": torch.zeros((), dtype=torch.int64, device=self.device),
            "count": torch.zeros((), dtype=torch.int64, device=self.device),
            "skipped": torch.zeros((), dtype=torch.int64, device=self.device),
            "passes": torch.zeros((), dtype=torch.int64, device=self.device),
        }

    def _after_step(
        self, loss: Tensor, logits: Tensor, labels: Tensor, acc: dict[str, Tensor], skipped: Tensor | None
    ) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        n = labels.numel()
        loss_sum = loss.detach().float() * n
        correct = (logits.argmax(1) == labels).sum()
        if skipped is None:
            acc["loss"] += loss_sum
            acc["correct"] += correct
            acc["count"] += n
            return
        kept = ~skipped  # a skipped step's (non-finite) loss stays out of the epoch's means, decided on the device
        acc["loss"] += torch.where(kept, loss_sum, 0.0)
        acc["correct"] += torch.where(kept, correct, 0)
        acc["count"] += kept.long() * n
        acc["skipped"] += skipped.long()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data: DeviceData | StreamingData | None = None) -> dict[str, float]:
        """Loss and error (%) on ``data`` (default: the clean test set), un-augmented; with ``top5`` also the
        top-5 error (``top5_error``). A streamed set gives each rank its share, whose sums are all-reduced."""
        data = self.eval_sets["test"] if data is None else data
        if self.world.parallel and not data.per_rank:
            return self._evaluate_sharded(data)
        top5 = self.config.reports_top5
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        correct5 = torch.zeros((), dtype=torch.int64, device=self.device)
        for images, labels in data.in_order(self.config.eval_batch_size):
            with self._autocast():
                logits = self.eval_forward(self._inputs(images, train=False)).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(1) == labels).sum()
            if top5:
                correct5 += _top5_correct(logits, labels)
        if data.per_rank and self.world.parallel:
            if self.config.distributed == "fsdp":  # FSDP's forward all-gathers: every rank runs as many
                size = self.config.image_size
                blank = torch.zeros(1, 3, size, size, dtype=torch.uint8, device=self.device)
                for _ in range(data.max_local_batches - data.local_batches()):
                    with self._autocast():
                        self.eval_forward(self._inputs(blank, train=False))
            distributed.sum_over_ranks([loss_sum, correct, correct5], self.world)
        self.model.train()
        n = len(data)
        out = {"loss": loss_sum.item() / n, "error": 100.0 * (1 - correct.item() / n)}
        if top5:
            out["top5_error"] = 100.0 * (1 - correct5.item() / n)
        return out

    def _evaluate_sharded(self, data: DeviceData) -> dict[str, float]:
        """:meth:`evaluate` with the batches dealt round-robin over the ranks: each batch's loss sum and correct
        count are computed as one process computes them, all-reduced into their slots, and added in batch order,
        so that every rank gets one process's numbers. Under FSDP, whose forward all-gathers, a rank without a
        batch in the last round runs one whose result it drops."""
        size, rank = self.world.size, self.world.rank
        batches = list(data.in_order(self.config.eval_batch_size))
        sums = torch.zeros(len(batches), device=self.device)
        right = torch.zeros(len(batches), dtype=torch.int64, device=self.device)
        right5 = torch.zeros(len(batches), dtype=torch.int64, device=self.device)
        top5 = self.config.reports_top5
        self.model.eval()
        for first in range(0, len(batches), size):
            j = first + rank
            if j >= len(batches) and self.config.distributed != "fsdp":
                break
            images, labels = batches[min(j, len(batches) - 1)]
            with self._autocast():
                logits = self.eval_forward(self._inputs(images, train=False)).float()
            if j < len(batches):
                sums[j] = F.cross_entropy(logits, labels, reduction="sum")
                right[j] = (logits.argmax(1) == labels).sum()
                if top5:
                    right5[j] = _top5_correct(logits, labels)
        self.model.train()
        distributed.sum_over_ranks([sums, right, right5] if top5 else [sums, right], self.world)
        loss_sum = torch.zeros((), device=self.device)
        for value in sums:
            loss_sum += value
        n = len(data)
        out = {"loss": loss_sum.item() / n, "error": 100.0 * (1 - right.sum().item() / n)}
        if top5:
            out["top5_error"] = 100.0 * (1 - right5.sum().item() / n)
        return out

    @torch.no_grad()
    def predict_train_labels(self) -> np.ndarray:
        self.model.eval()
        preds = [
            self.eval_forward(self._inputs(images, train=False)).argmax(1)
            for images, _ in self.train_set.in_order(self.config.eval_batch_size)
        ]
        self.model.train()
        return torch.cat(preds).cpu().numpy()

    # ------------------------------------------------------------------ state
    def _state(self, epoch: int, step: int, acc: dict[str, Tensor]) -> dict[str, Any]:
        state = {
            "epoch": epoch,
            "step_in_epoch": step,
            "device_type": self.device.type,
            "model": distributed.model_state(self.model, self.world),
            "optimizer": distributed.optimizer_state(self.model, self.optimizer, self.world),
            "schedule": self.schedule.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_aug": self.aug_gen.get_state(),
            "accumulators": {k: v.detach().cpu() for k, v in acc.items()},
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.world.parallel:  # every rank's own generators, counters and buffers; rank 0 writes them
            state["world_size"] = self.world.size
            state["ranks"] = distributed.gather(self._rank_state(state, acc), self.world)
        return state

    def _rank_state(self, state: dict[str, Any], acc: dict[str, Tensor]) -> dict[str, Any]:
        """What differs between the ranks of a data-parallel run, on the CPU."""
        mine = {key: state[key] for key in ("rng_cpu", "rng_aug", "rng_cuda") if key in state}
        mine["accumulators"] = {k: v.detach().cpu() for k, v in acc.items()}
        mine["buffers"] = [b.detach().cpu() for b in self.model.buffers()]
        own = distributed.rank_optimizer_state(self.model, self.optimizer, self.world, self.config, self.per_replica)
        if own is not None:
            mine["optimizer"] = own
        return mine

    def _load_state(self, state: dict[str, Any]) -> tuple[int, int, dict[str, Tensor]]:
        saved_size = state.get("world_size", 1)
        if saved_size != self.world.size:
            raise ValueError(
                f"--resume: {self.run_dir} was checkpointed by {saved_size} rank(s) and this is {self.world.size}; "
                f"resume it on {saved_size} (torchrun --nproc_per_node ...): each rank's share of the batch, its "
                "random streams and per_replica's m depend on the number of ranks"
            )
        # Checkpoints from before "device_type" was saved hold "rng_cuda" exactly when they were made on CUDA.
        saved_on = state.get("device_type", "cuda" if "rng_cuda" in state else "cpu")
        same_device = saved_on == self.device.type
        if not same_device and state["step_in_epoch"] > 0:
            raise ValueError(
                f"--resume: {self.run_dir} was checkpointed on {saved_on} in the middle of epoch "
                f"{state['epoch'] + 1} (after step {state['step_in_epoch']}); resume it on {saved_on} (the device "
                "may change only at an epoch boundary, where every generator is re-seeded)"
            )
        distributed.load_model_state(self.model, state.get("model"), self.world)
        if state.get("optimizer") is not None:  # under FSDP each rank's shards are in its entry of "ranks"
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        mine = state["ranks"][self.world.rank] if self.world.parallel else state
        if self.world.parallel:
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), mine["buffers"], strict=True):
                    buffer.copy_(saved)
            if "optimizer" in mine:
                distributed.load_rank_optimizer_state(self.model, self.optimizer, mine["optimizer"])
        torch.set_rng_state(mine["rng_cpu"])
        if same_device:  # otherwise the epoch starts afresh and re-seeds the device's generators
            self.aug_gen.set_state(mine["rng_aug"])
            if "rng_cuda" in mine:
                torch.cuda.set_rng_state(mine["rng_cuda"], self.device)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        acc = {**self.zero_accumulators(), **{k: v.to(self.device) for k, v in mine["accumulators"].items()}}
        return state["epoch"], state["step_in_epoch"], acc

    # ------------------------------------------------------------------ the run
    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train to the end (or until SIGTERM or SIGINT, which raise :class:`Interrupted` after saving), owning the
        run directory's lock throughout."""
        with self.files.lock():
            return self._run(resume)

    def _run(self, resume: bool) -> dict[str, Any]:
        cfg = self.config
        from_checkpoint = self.files.check(cfg, resume)
        self._setup()
        zero = self.zero_accumulators()
        start_epoch, start_step, acc = 0, 0, {k: v.clone() for k, v in zero.items()}
        if from_checkpoint:
            start_epoch, start_step, acc = self._load_state(self.files.load_checkpoint())
            self.files.truncate_metrics(start_epoch)
        else:
            self.files.open(cfg, self._train_labels_override)
        previous = {s: signal.signal(s, self._on_stop_signal) for s in STOP_SIGNALS} if _main_thread() else {}
        benchmark = torch.backends.cudnn.benchmark
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        started = time.perf_counter()
        try:
            epochs = tqdm(range(start_epoch, self.epochs), disable=not self.progress, desc=cfg.name, unit="epoch")
            for epoch in epochs:
                if start_step == 0:
                    _seed_epoch(cfg.seed, epoch, self.aug_gen, self.world.rank)
                epoch_start, epoch_cpu = time.perf_counter(), time.process_time()
                self.model.train()
                for i, (images, labels) in enumerate(self._batches(epoch, start_step), start=start_step):
                    self._step(images, labels, acc)
                    if distributed.any_rank(self._stop, self.world):  # all ranks stop after the same step
                        self.files.save_checkpoint(self._state(epoch, i + 1, acc))
                        raise Interrupted(
                            f"{self._signal.name}: checkpoint saved in epoch {epoch + 1} after step {i + 1}; "
                            "continue with the same command (train: add --resume)",
                            self._signal,
                        )
                start_step = 0
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the epoch's time includes its queued kernels
                record = self._end_epoch(epoch, acc, time.perf_counter() - epoch_start, time.process_time() - epoch_cpu)
                epochs.set_postfix(
                    train_loss=f"{record['train_loss']:.3f}", test_error=f"{record.get('test_error', math.nan):.2f}"
                )
                acc = {k: v.clone() for k, v in zero.items()}
                self.files.save_checkpoint(self._state(epoch + 1, 0, acc))
        finally:
            torch.backends.cudnn.benchmark = benchmark
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self._finish(time.perf_counter() - started)

    def _on_stop_signal(self, signum, frame) -> None:
        """SIGTERM and SIGINT alike: stop after the current step with a checkpoint."""
        self._signal = signal.Signals(signum)
        self._stop = True

    def _last_step_lr(self) -> float:
        """The learning rate of the latest step (the schedule has already moved on to the next step's)."""
        schedule = self.schedule
        return schedule.base_lrs[0] * schedule.lr_lambdas[0](schedule.last_epoch - 1)

    def _check_finite(self, epoch: int, loss_sum: float, count: int, skipped: int) -> None:
        cfg, steps = self.config, self._epoch_steps(epoch)
        remedy = f"lower lr (now {cfg.lr:g})" + (f" or rho (now {cfg.rho:g})" if cfg.method != "sgd" else "")
        remedy += ", or set grad_clip" if cfg.grad_clip is None else f", or grad_clip (now {cfg.grad_clip:g})"
        if self.scaler is None:
            if skipped:
                raise TrainingDiverged(
                    f"epoch {epoch + 1}: {skipped} of {steps} steps had a non-finite loss or gradient and SAM "
                    f"skipped them (precision {cfg.precision}, no GradScaler); {remedy}"
                )
            if not math.isfinite(loss_sum):
                raise TrainingDiverged(f"epoch {epoch + 1}: training loss is {loss_sum / max(1, count)}; {remedy}")
            return
        if count == 0:
            raise TrainingDiverged(
                f"epoch {epoch + 1}: GradScaler skipped all {steps} steps (inf/NaN gradients in every one); {remedy}"
            )
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(
                f"epoch {epoch + 1}: training loss is {loss_sum / count} on the steps GradScaler kept; {remedy}"
            )

    def _end_epoch(self, epoch: int, acc: dict[str, Tensor], seconds: float, cpu_seconds: float) -> dict[str, Any]:
        # The epoch's one read of its device counters (summed over the ranks of a data-parallel run).
        counters = distributed.reduce_counters(acc, self.world)
        loss_sum, correct, count, skipped, passes = torch.stack(
            [counters[k].double() for k in ("loss", "correct", "count", "skipped", "passes")]
        ).tolist()
        count, skipped = int(count), int(skipped)
        self._check_finite(epoch, loss_sum, count, skipped)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / count,
            "train_error": 100.0 * (1 - correct / count),
            "lr": self._last_step_lr(),
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,  # this process's CPU time: other processes' load does not count
            "skipped_steps": skipped,
            "passes_per_step": passes / self._epoch_steps(epoch),
        }
        if (epoch + 1) % self.config.eval_every == 0 or epoch + 1 == self.epochs:
            distributed.broadcast_buffers(self.model, self.world)  # every rank evaluates (and saves) rank 0's model
            for split, data in self.eval_sets.items():
                evaluation = self.evaluate(data)
                record[f"{split}_loss"], record[f"{split}_error"] = evaluation["loss"], evaluation["error"]
                if "top5_error" in evaluation:
                    record[f"{split}_top5_error"] = evaluation["top5_error"]
        self.files.append_metrics(record)
        return record

    def _finish(self, seconds: float) -> dict[str, Any]:
        lines = self.files.metrics()
        last = lines[-1]
        metrics: dict[str, Any] = {}
        for split in self.eval_sets:
            metrics[f"{split}_error"], metrics[f"{split}_loss"] = last[f"{split}_error"], last[f"{split}_loss"]
            if f"{split}_top5_error" in last:
                metrics[f"{split}_top5_error"] = last[f"{split}_top5_error"]
        metrics.update(
            train_error=last["train_error"],
            train_loss=last["train_loss"],
            skipped_steps=sum(x["skipped_steps"] for x in lines),
            # metrics.jsonl of runs started before passes were counted lack them
            passes_per_step=sum(x.get("passes_per_step", math.nan) for x in lines) / len(lines),
            train_seconds=sum(x["seconds"] for x in lines),
            train_cpu_seconds=sum(x.get("cpu_seconds", math.nan) for x in lines),
        )
        if self.config.label_noise > 0:
            metrics["noisy_labels_fitted"] = self._noisy_labels_fitted()
        summary = {
            "experiment": self.config.name,
            "method": self.method,
            "seed": self.config.seed,
            "metrics": metrics,
            "epochs": self.epochs,
            "seconds": sum(x["seconds"] for x in lines),
            "device": str(self.device)
            + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda" else ""),
            "config": self.config.to_dict(),
        }
        if isinstance(self.data, ImageFolderData):
            summary["classes"] = list(self.data.classes)  # label i is classes[i] (the sorted train/ folder names)
        if self.finetuned is not None:
            summary["finetune"] = self.finetuned
        if self.world.parallel:
            cfg = self.config
            summary["distributed"] = {"world_size": self.world.size, "backend": self.world.backend}
            summary["distributed"].update(mode=cfg.distributed, perturbation=cfg.perturbation)
        self.files.finish(summary, distributed.model_state(self.model, self.world))
        return summary

    def _noisy_labels_fitted(self) -> float | None:
        """Share (%) of the originally mislabelled training examples whose prediction is their noisy label.

        Measured against the config's noisy labels, also in a bootstrap run (which trains on predicted labels).
        """
        noisy, clean = self.data.noisy_train_labels, self.data.clean_train_labels
        mislabelled = noisy != clean
        if not mislabelled.any():
            return None
        predicted = self.predict_train_labels()
        return 100.0 * float(np.mean(predicted[mislabelled] == noisy[mislabelled]))


def _top5_correct(logits: Tensor, labels: Tensor) -> Tensor:
    """How many labels are among their row's 5 largest logits (all of them with fewer than 5 classes)."""
    k = min(5, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum()


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
    with first.files.lock():  # one owner from the first check to the bootstrap run's end
        return _train_locked(first, config, run_dir, resume, progress)


def _train_locked(
    first: Trainer, config: TrainConfig, run_dir: Path, resume: bool, progress: bool | None
) -> list[dict[str, Any]]:
    summaries = [first.files.finished_summary(config, resume) or first.run(resume=resume)]
    if not config.bootstrap:
        return summaries
    bootstrap_dir = run_dir / "bootstrap"
    labels_file = bootstrap_dir / "train_labels.npy"
    world = first.world
    labels = distributed.on_main(lambda: np.load(labels_file) if labels_file.is_file() else None, world)
    if labels is None:
        if "model" not in first.__dict__:
            first._setup()
            distributed.load_model_file(first.model, run_dir / "model.pt", world)
        labels = first.predict_train_labels()
    second = Trainer(config, bootstrap_dir, progress=progress, train_labels=labels, method_suffix="+bootstrap")
    resume_second = resume and distributed.on_main((bootstrap_dir / "config.yaml").is_file, world)
    with second.files.lock():
        summaries.append(second.files.finished_summary(config, resume_second) or second.run(resume=resume_second))
    return summaries
