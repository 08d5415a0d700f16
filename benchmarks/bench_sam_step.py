"""What one SAM step costs beyond its two forward-backward passes.

On the same model, batch and base optimizer (SGD, momentum 0.9, weight decay 5e-4; fused on CUDA as the
harness builds it, PyTorch's default elsewhere) the variants are:

* ``sgd``: one plain step (forward, backward, ``step``);
* ``2pass``: two forward-backward passes and one SGD step, the floor for any SAM implementation;
* ``sam``: :class:`sharpness.SAM` in its two-pass form (``first_step``, second pass, ``second_step``)
  with ``model=`` (every buffer restored after the perturbed pass), as the training harness runs it;
* ``sam-nomodel``: the same without ``model=`` (no buffer backup/restore);
* ``sam-noskip``: ``model=`` and ``skip_nonfinite=False`` (no finiteness check of the gradients);
* ``davda54``: a copy of the algorithm of the most widely used PyTorch SAM, David Samuel's ``SAM`` class
  (github.com/davda54/sam, MIT licence), written here from its public algorithm: a per-parameter Python loop
  that clones ``old_p`` and adds ``e_w = p.grad * scale``, the norm as ``torch.norm(torch.stack([...]))``;
* ``davda54+bn``: the same with that repository's ``enable_running_stats`` / ``disable_running_stats``
  helpers around the passes (BatchNorm momentum set to 0 in the perturbed pass), its example's way of
  keeping the running statistics of the clean pass.

The variants are timed in rounds; in each round every variant runs ``--steps`` steps (CUDA synchronised
before the clock is read), in an order rotated from round to round, so slow phases of a shared machine hit
all variants alike. The table gives the median ms per step with its interquartile range and minimum, and the
overhead of each SAM variant over ``2pass``: the difference of the medians in ms, and in percent the median
(and IQR) of the per-round ratios. On CPU with one thread the clock is, by default, the calling thread's CPU
time (``time.thread_time``: all the work runs in that thread, and time the machine's other processes take
from it is not counted); ``--clock wall`` gives wall time, and the JSON holds both. On CUDA it also gives the
peak memory of a few steps of each variant run alone (model, gradients, optimizer state, activations) and
checks with ``torch.cuda.set_sync_debug_mode("error")`` that a step does not synchronise with the host.
The persistent extra state (weight copies, buffer backups) is reported on every device.

    python benchmarks/bench_sam_step.py --device cpu --threads 1 --json sam_step_cpu.json
    python benchmarks/bench_sam_step.py --device cuda --json sam_step_cuda.json
    python benchmarks/bench_sam_step.py --device cuda --precision bf16 --channels-last --models wrn-16-8
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharpness import SAM
from sharpness.harness.models import build_model

from provenance import run_info

VARIANTS = ("sgd", "2pass", "sam", "sam-nomodel", "sam-noskip", "davda54", "davda54+bn")
SAM_VARIANTS = ("sam", "sam-nomodel", "sam-noskip", "davda54", "davda54+bn")


# ---------------------------------------------------------------------- davda54/sam, for comparison
class Davda54SAM(torch.optim.Optimizer):
    """The algorithm of github.com/davda54/sam (David Samuel, MIT licence), rewritten for this benchmark.

    Per parameter, in Python: ``old_p = p.data.clone()``, ``e_w = p.grad * rho / (norm + 1e-12)``,
    ``p.add_(e_w)``; then ``p.data = old_p`` and the base step. The norm is
    ``torch.norm(torch.stack([p.grad.norm(p=2) for every p]), p=2)``. ``adaptive`` (ASAM) multiplies by
    ``p ** 2`` (and ``|p|`` in the norm), as that class does.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **kwargs: Any) -> None:
        if rho < 0.0:
            raise ValueError(f"Invalid rho, should be non-negative: {rho}")
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)  # climb to the local maximum "w + e(w)"
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]  # get back to "w" from "w + e(w)"
        self.base_optimizer.step()  # do the actual "sharpness-aware" update
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self) -> Tensor:
        shared_device = self.param_groups[0]["params"][0].device
        return torch.norm(
            torch.stack(
                [
                    ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2).to(shared_device)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )


def _disable_running_stats(model: nn.Module) -> None:  # davda54/sam example/utility/bypass_bn.py
    def _disable(module: nn.Module) -> None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.backup_momentum = module.momentum
            module.momentum = 0

    model.apply(_disable)


def _enable_running_stats(model: nn.Module) -> None:
    def _enable(module: nn.Module) -> None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and hasattr(module, "backup_momentum"):
            module.momentum = module.backup_momentum

    model.apply(_enable)


# ---------------------------------------------------------------------- models
class ManySmall(nn.Module):
    """``depth`` blocks of Linear(width, width), LayerNorm(width), GELU: 4 small tensors per block."""

    def __init__(self, depth: int = 100, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()) for _ in range(depth))
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "cnn-small": (lambda: build_model("cnn-small", 10), (3, 32, 32)),
    "cnn-small-1x28": (lambda: build_model("cnn-small", 10, in_channels=1), (1, 28, 28)),  # Fashion-MNIST's shape
    "resnet20": (lambda: build_model("resnet20", 10), (3, 32, 32)),
    "many-small": (lambda: ManySmall(100, 32), (32,)),
    "wrn-16-8": (lambda: build_model("wrn-16-8", 10), (3, 32, 32)),
}


# ---------------------------------------------------------------------- one variant
class Runner:
    """A model copy, its optimizer and a step function for one variant."""

    def __init__(self, variant: str, template: nn.Module, batches: list[tuple[Tensor, Tensor]], args) -> None:
        self.variant = variant
        self.model = copy.deepcopy(template)
        self.model.train()
        self.batches = batches
        self.i = 0
        self.amp = torch.bfloat16 if args.precision == "bf16" else None
        self.device = batches[0][0].device
        kwargs: dict[str, Any] = dict(lr=args.lr, momentum=0.9, weight_decay=5e-4)
        if self.device.type == "cuda" and not args.no_fused:
            kwargs["fused"] = True
        params = self.model.parameters()
        if variant in ("sgd", "2pass"):
            self.opt = torch.optim.SGD(params, **kwargs)
        elif variant == "sam":
            self.opt = SAM(params, torch.optim.SGD, rho=0.05, model=self.model, **kwargs)
        elif variant == "sam-nomodel":
            self.opt = SAM(params, torch.optim.SGD, rho=0.05, **kwargs)
        elif variant == "sam-noskip":
            self.opt = SAM(params, torch.optim.SGD, rho=0.05, model=self.model, skip_nonfinite=False, **kwargs)
        elif variant in ("davda54", "davda54+bn"):
            self.opt = Davda54SAM(params, torch.optim.SGD, rho=0.05, **kwargs)
        else:
            raise ValueError(variant)
        self.step = {
            "sgd": self._sgd,
            "2pass": self._two_pass,
            "davda54": self._davda,
            "davda54+bn": self._davda_bn,
        }.get(variant, self._sam)

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        ctx = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with ctx:
            logits = self.model(x)
        return F.cross_entropy(logits.float(), y)

    def _batch(self) -> tuple[Tensor, Tensor]:
        self.i = (self.i + 1) % len(self.batches)
        return self.batches[self.i]

    def _sgd(self) -> Tensor:
        x, y = self._batch()
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(x, y)
        loss.backward()
        self.opt.step()
        return loss

    def _two_pass(self) -> Tensor:
        x, y = self._batch()
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(x, y)
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        self._loss(x, y).backward()
        self.opt.step()
        return loss

    def _sam(self) -> Tensor:
        x, y = self._batch()
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(x, y)
        loss.backward()
        self.opt.first_step(zero_grad=True)
        self._loss(x, y).backward()
        self.opt.second_step()
        return loss

    def _davda(self) -> Tensor:
        x, y = self._batch()
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(x, y)
        loss.backward()
        self.opt.first_step(zero_grad=True)
        self._loss(x, y).backward()
        self.opt.second_step()
        return loss

    def _davda_bn(self) -> Tensor:
        x, y = self._batch()
        self.opt.zero_grad(set_to_none=True)
        _enable_running_stats(self.model)
        loss = self._loss(x, y)
        loss.backward()
        self.opt.first_step(zero_grad=True)
        _disable_running_stats(self.model)
        self._loss(x, y).backward()
        self.opt.second_step()  # momentum stays 0 until the next step's enable, as in that example's loop
        return loss

    def extra_state_bytes(self) -> int:
        """Bytes of state a SAM variant keeps beyond its base optimizer's (weight copies, buffer backups)."""
        if self.variant in ("sgd", "2pass"):
            return 0
        if isinstance(self.opt, SAM):  # its copies of w and its buffer backup (private; opt.state is the base's)
            kept = [*self.opt._w.copies, *self.opt._run.buffer_backup]
        else:  # the davda54 class keeps old_p in its own state, the base optimizer's momentum elsewhere
            kept = [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in kept)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def bench_model(name: str, args, device: torch.device) -> dict[str, Any]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    template = factory().to(device)
    if args.channels_last and len(shape) == 3:
        template = template.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.pool):
        x = torch.randn(args.batch, *shape, generator=gen).to(device)
        if args.channels_last and len(shape) == 3:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, torch.randint(0, 10, (args.batch,), generator=gen).to(device)))
    runners = {v: Runner(v, template, batches, args) for v in args.variants}
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step()
    _sync(device)

    wall: dict[str, list[float]] = {v: [] for v in args.variants}
    cpu: dict[str, list[float]] = {v: [] for v in args.variants}
    order = list(args.variants)
    for r in range(args.rounds):
        k = r % len(order)
        for v in order[k:] + order[:k]:
            runner = runners[v]
            _sync(device)
            start, start_cpu = time.perf_counter(), time.thread_time()
            for _ in range(args.steps):
                runner.step()
            _sync(device)
            wall[v].append((time.perf_counter() - start) * 1e3 / args.steps)
            cpu[v].append((time.thread_time() - start_cpu) * 1e3 / args.steps)
    final_losses = {v: float(runners[v].step().detach()) for v in args.variants}
    samples = cpu if args.clock == "cpu" else wall

    rows = []
    for v in args.variants:
        q1, med, q3 = quartiles(samples[v])
        row: dict[str, Any] = {
            "variant": v,
            "clock": args.clock,
            "median_ms": med,
            "q1_ms": q1,
            "q3_ms": q3,
            "min_ms": min(samples[v]),
            "median_wall_ms": statistics.median(wall[v]),
            "median_thread_cpu_ms": statistics.median(cpu[v]),
            "samples_wall_ms": wall[v],
            "samples_thread_cpu_ms": cpu[v],
            "extra_state_MiB": runners[v].extra_state_bytes() / 2**20,
            "final_loss": final_losses[v],
        }
        if v in SAM_VARIANTS and "2pass" in samples:
            ratios = [100.0 * (a / b - 1.0) for a, b in zip(samples[v], samples["2pass"], strict=True)]
            rq1, rmed, rq3 = quartiles(ratios)
            row.update(overhead_pct=rmed, overhead_q1_pct=rq1, overhead_q3_pct=rq3)
            row["overhead_ms"] = med - statistics.median(samples["2pass"])
        rows.append(row)

    n_params = sum(p.numel() for p in template.parameters())
    n_tensors = sum(1 for _ in template.parameters())
    n_buffers = sum(1 for _ in template.buffers())
    del runners
    result = {
        "model": name,
        "parameters": n_params,
        "parameter_tensors": n_tensors,
        "buffers": n_buffers,
        "rows": rows,
    }
    if device.type == "cuda":
        memory, syncs = {}, {}
        for v in args.variants:
            memory[v], syncs[v] = _cuda_memory_and_sync(v, template, batches, args, device)
        for row in rows:
            row["peak_MiB"] = memory[row["variant"]]
            row["host_sync"] = syncs[row["variant"]]
            if row["variant"] in SAM_VARIANTS and "2pass" in memory:
                row["peak_extra_MiB"] = memory[row["variant"]] - memory["2pass"]
    return result


def _cuda_memory_and_sync(variant: str, template: nn.Module, batches, args, device: torch.device) -> tuple[float, str]:
    """Peak memory of 3 steps of ``variant`` alone (above what was allocated before it), and a sync check."""
    gc.collect()
    torch.cuda.empty_cache()
    _sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner = Runner(variant, template, batches, args)
    for _ in range(3):
        runner.step()
    _sync(device)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.step()
        sync = "none"
    except RuntimeError as exc:
        sync = "syncs: " + str(exc).splitlines()[0][:80]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    del runner
    return peak, sync


def print_table(results: list[dict[str, Any]], header: str, cuda: bool) -> None:
    print(header)
    columns = f"{'model':11s} {'variant':12s} {'median ms':>10s} {'IQR ms':>17s} {'min ms':>9s}"
    columns += f" {'over 2pass ms':>13s} {'over 2pass %':>12s} {'IQR %':>15s}"
    columns += f" {'extra state MiB':>15s} {'peak MiB':>9s} {'extra peak MiB':>14s}"
    if cuda:
        columns += "  host sync"
    print(columns)
    for res in results:
        for row in res["rows"]:
            iqr = f"{row['q1_ms']:.2f}-{row['q3_ms']:.2f}"
            has = "overhead_pct" in row
            over_ms = f"{row['overhead_ms']:+.2f}" if has else "-"
            over = f"{row['overhead_pct']:+.1f}" if has else "-"
            over_iqr = f"{row['overhead_q1_pct']:+.1f}..{row['overhead_q3_pct']:+.1f}" if has else "-"
            if cuda:
                peak = f"{row['peak_MiB']:.1f}"
                extra = f"{row['peak_extra_MiB']:+.1f}" if "peak_extra_MiB" in row else "-"
            else:
                peak, extra = "n/a (cpu)", "n/a (cpu)"
            line = (
                f"{res['model']:11s} {row['variant']:12s} {row['median_ms']:10.2f} {iqr:>17s} {row['min_ms']:9.2f}"
                f" {over_ms:>13s} {over:>12s} {over_iqr:>15s} {row['extra_state_MiB']:15.2f} {peak:>9s} {extra:>14s}"
            )
            if cuda:
                line += f"  {row['host_sync']}"
            print(line)
    for res in results:
        print(
            f"{res['model']}: {res['parameters']} parameters in {res['parameter_tensors']} tensors, "
            f"{res['buffers']} buffers"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--models", nargs="+", default=None, choices=list(MODELS), help="default: all but wrn-16-8 on CPU"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15, help="timed samples per variant (default 15)")
    parser.add_argument("--steps", type=int, default=None, help="steps per sample (default 1 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 3 CPU, 10 CUDA)")
    parser.add_argument("--pool", type=int, default=4, help="distinct random batches cycled through (default 4)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast forward")
    parser.add_argument("--channels-last", action="store_true", help="channels-last images and model (CNNs)")
    parser.add_argument("--no-fused", action="store_true", help="on CUDA, the default (foreach) SGD, not fused")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU timing: 1)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default=None,
        help="what the table reports: wall time, or this thread's CPU time (default: cpu on CPU with 1 thread, "
        "which a shared machine's other processes barely disturb; wall otherwise). The JSON holds both.",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.models is None:
        args.models = list(MODELS) if cuda else ["cnn-small", "resnet20", "many-small"]
    if args.clock is None:
        args.clock = "cpu" if not cuda and torch.get_num_threads() == 1 else "wall"
    if args.clock == "cpu" and (cuda or torch.get_num_threads() != 1):
        parser.error("--clock cpu measures the calling thread only: use it on CPU with --threads 1")
    args.steps = args.steps or (20 if cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)

    info = run_info("bench_sam_step")  # before the runs: the code they import is the code of this moment
    results = [bench_model(name, args, device) for name in args.models]
    device_name = str(device) + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")
    header = (
        f"device={device_name} batch={args.batch} precision={args.precision} channels_last={args.channels_last} "
        f"fused_sgd={cuda and not args.no_fused} threads={torch.get_num_threads()} rounds={args.rounds} "
        f"steps/sample={args.steps} clock={args.clock} torch={torch.__version__}"
    )
    print_table(results, header, cuda)
    out = {
        **info,
        "device": device_name,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
