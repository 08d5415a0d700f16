"""What each SAM variant costs per step relative to SGD: passes and time, in one process, alternated.

Every method is built as the harness builds it (``sharpness.harness.build.build_optimizer`` with the config's
defaults for the variant's options: SGD with momentum 0.9 and weight decay 5e-4 underneath) on the same model and
batches, and steps through the library's closure form (``opt.step(closure)``, ESAM's per-example closure). Forward
and backward passes are counted by hooks on the model, so a forward without backward (ESAM's sharpness
evaluation) shows as such. Steps are timed in rounds; in each round every method runs ``--steps`` steps, in an
order rotated from round to round, so slow phases of a shared machine hit all methods alike. The table gives the
median ms per step with its interquartile range and, per method, the median of the per-round ratios to SGD.
On CPU with one thread the clock is the calling thread's CPU time (other processes' load is not counted).

    python benchmarks/bench_variants.py --device cpu --threads 1 --json variants_cpu.json
    python benchmarks/bench_variants.py --device cuda --models wrn-16-8 --json variants_cuda.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharpness import ESAM
from sharpness.harness.build import build_optimizer
from sharpness.harness.config import METHOD_NAMES, TrainConfig, apply_overrides

from bench_sam_step import MODELS, quartiles
from provenance import run_info


class Runner:
    """One method's model copy, optimizer, closure and pass counters."""

    def __init__(
        self,
        method: str,
        template: nn.Module,
        batches: list[tuple[Tensor, Tensor]],
        steps: int,
        overrides: list[str] = (),
    ) -> None:
        self.method = method
        self.model = copy.deepcopy(template).train()
        config = TrainConfig(method=method, lr=0.01, momentum=0.9, weight_decay=5e-4, device="cpu")
        config = apply_overrides(config, list(overrides))
        self.opt = build_optimizer(config, self.model, total_steps=steps)
        self.batches, self.i = batches, 0
        self.forwards = self.backwards = self.steps = 0
        # The inputs need no gradient, so torch warns that the hook sees the outputs' gradients: all it counts.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        self.model.register_forward_hook(self._count_forward)
        self.model.register_full_backward_hook(self._count_backward)

    def _count_forward(self, *_: Any) -> None:
        self.forwards += 1

    def _count_backward(self, *_: Any) -> None:
        self.backwards += 1

    def step(self) -> Tensor:
        x, y = self.batches[self.i]
        self.i = (self.i + 1) % len(self.batches)
        self.steps += 1
        model, opt = self.model, self.opt
        opt.zero_grad(set_to_none=True)
        if isinstance(opt, ESAM):
            return opt.step(
                lambda index=None: F.cross_entropy(
                    model(x if index is None else x[index]), y if index is None else y[index], reduction="none"
                )
            )

        def closure() -> Tensor:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if self.method == "sgd":
            loss = closure()
            opt.step()
            return loss
        return opt.step(closure)


def bench_model(name: str, args, device: torch.device) -> dict[str, Any]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    template = factory().to(device)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(args.batch, *shape, generator=gen).to(device),
            torch.randint(0, 10, (args.batch,), generator=gen).to(device),
        )
        for _ in range(args.pool)
    ]
    total = args.warmup + args.rounds * args.steps
    runners = {m: Runner(m, template, batches, total) for m in args.methods}
    for label, (method, overrides) in args.variants.items():
        runners[label] = Runner(method, template, batches, total, overrides)
    methods = [*args.methods, *args.variants]
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step()
        runner.forwards = runner.backwards = runner.steps = 0
    samples: dict[str, list[float]] = {m: [] for m in methods}
    order = list(methods)
    for r in range(args.rounds):
        k = r % len(order)
        for m in order[k:] + order[:k]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter() if args.clock == "wall" else time.thread_time()
            for _ in range(args.steps):
                runners[m].step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter() if args.clock == "wall" else time.thread_time()
            samples[m].append((now - start) * 1e3 / args.steps)
    rows = []
    for m in methods:
        q1, med, q3 = quartiles(samples[m])
        runner = runners[m]
        row = {
            "method": m,
            "optimizer": type(runner.opt).__name__,
            "median_ms": med,
            "q1_ms": q1,
            "q3_ms": q3,
            "forwards_per_step": runner.forwards / runner.steps,
            "backwards_per_step": runner.backwards / runner.steps,
            "samples_ms": samples[m],
        }
        if "sgd" in samples:
            ratios = [a / b for a, b in zip(samples[m], samples["sgd"], strict=True)]
            row["time_vs_sgd_q1"], row["time_vs_sgd"], row["time_vs_sgd_q3"] = quartiles(ratios)
        rows.append(row)
    return {"model": name, "parameters": sum(p.numel() for p in template.parameters()), "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS), help="default: cnn-small, resnet20")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE,...",
        help="also a method with other options, named LABEL (its method is LABEL's part before '-'), e.g. "
        "interval-k4:interval_k=4 (repeatable)",
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10, help="timed samples per method (default 10)")
    parser.add_argument("--steps", type=int, default=10, help="steps per sample (default 10: the schedules' cycles)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pool", type=int, default=4, help="distinct random batches cycled through (default 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU timing: 1)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default=None, help="default: cpu with 1 CPU thread")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.variants = {}
    for spec in args.variant:
        label, _, options = spec.partition(":")
        method = label.split("-")[0]
        if method not in METHOD_NAMES or not options:
            parser.error(f"--variant {spec}: expected LABEL:KEY=VALUE,... with LABEL starting with a method name")
        args.variants[label] = (method, [f"method={method}", *options.split(",")])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock is None:
        args.clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        parser.error("--clock cpu measures the calling thread only: use it on CPU with --threads 1")
    args.models = args.models or ["cnn-small", "resnet20"]
    if "sgd" not in args.methods:
        args.methods = ["sgd", *args.methods]
    info = run_info("bench_variants")
    results = [bench_model(name, args, device) for name in args.models]
    print(
        f"device={device} batch={args.batch} rounds={args.rounds} steps/sample={args.steps} clock={args.clock} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    print(
        f"{'model':10s} {'method':11s} {'optimizer':19s} {'fwd/step':>8s} {'bwd/step':>8s} {'median ms':>10s} "
        f"{'x SGD':>6s} {'IQR x SGD':>12s}"
    )
    for res in results:
        for row in res["rows"]:
            print(
                f"{res['model']:10s} {row['method']:11s} {row['optimizer']:19s} {row['forwards_per_step']:8.2f} "
                f"{row['backwards_per_step']:8.2f} {row['median_ms']:10.2f} {row['time_vs_sgd']:6.2f} "
                f"{row['time_vs_sgd_q1']:5.2f}-{row['time_vs_sgd_q3']:.2f}"
            )
    out = {
        **info,
        "device": str(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "variants")},
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
