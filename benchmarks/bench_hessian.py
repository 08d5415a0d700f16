"""Side-by-side timing and accuracy of sharpness.analysis against PyHessian (Yao et al. 2020).

Same model (``--model cnn``: a small CNN with BatchNorm on 3x16x16 images, where a product is a few
milliseconds and per-kernel overheads weigh; ``--model resnet20``: the harness's CIFAR ResNet-20 on
3x32x32 images, where the convolutions dominate; BatchNorm in eval mode in both libraries, as
PyHessian forces), same data, same number of Lanczos / power iterations:

* top eigenvalue: PyHessian's power iteration (``eigenvalues(top_n=1)``) against our Lanczos and
  our power iteration;
* top-5: PyHessian's power iteration with deflation, ``maxIter`` iterations per eigenvalue,
  against our Lanczos with the same ``maxIter`` iterations in all;
* density: PyHessian's SLQ (``density(iter, n_v)``) against ours (same starts and iterations);
* per product: the time of one Hessian-vector product, on an operator / PyHessian object built
  beforehand (``--iters`` products timed, divided by their number).

PyHessian draws its random vectors from torch's global generator, so ``torch.manual_seed(0)`` is
called before every PyHessian call: its figures are reproducible from run to run.

``tol`` is 0 for PyHessian so that it runs exactly the iterations asked (its default 1e-3 stops
earlier and less accurately). Accuracy is measured against a reference from our float64 Lanczos
with many more iterations, whose Ritz residuals bound its own error (printed).

With ``--batches 1`` PyHessian gets ``data=`` (it keeps one gradient graph and reuses it) and we
use ``cache_graphs=True`` (the same trick); with more batches PyHessian gets ``dataloader=`` and
both recompute the forward and double backward per batch per product.

PyHessian 0.1 predates ``torch.eig``'s removal (PyTorch 2.0); its ``density()`` calls it on the
symmetric tridiagonal matrix. This script installs ``torch.eig`` back, for the run only, as a
wrapper around ``torch.linalg.eigh`` returning PyHessian's expected ``(values with a zero
imaginary column, vectors)``. Nothing else of PyHessian is changed.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_hessian.py --device cpu`` (``pip install
pyhessian==0.1``, the ``bench`` extra); ``python benchmarks/bench_hessian.py --device cuda --repeats 5
--json bench_cuda.json`` on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sharpness.analysis import HessianOperator, power_iteration, spectral_density, top_eigenpairs
from sharpness.harness.models import build_model

from provenance import run_info


def _eig_shim(matrix: torch.Tensor, eigenvectors: bool = False):
    """``torch.eig`` as PyHessian calls it: values as an (n, 2) real/imaginary tensor."""
    values, vectors = torch.linalg.eigh(matrix)
    return torch.stack([values, torch.zeros_like(values)], dim=1), vectors


IMAGE_SIZE = {"cnn": 16, "resnet20": 32}


def make_model(name: str = "cnn") -> nn.Module:
    if name == "resnet20":
        return build_model("resnet20", 10)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip


def make_data(num_batches: int, batch_size: int, seed: int = 0, size: int = 16):
    """Class-dependent Gaussian images (so a few SGD steps learn something), 3 x size x size."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 3, size, size, generator=gen)
    batches = []
    for _ in range(num_batches):
        y = torch.randint(0, 10, (batch_size,), generator=gen)
        x = centers[y] + 2.0 * torch.randn(batch_size, 3, size, size, generator=gen)
        batches.append((x, y))
    return batches


def train_briefly(model: nn.Module, batches, steps: int = 30) -> None:
    """A few SGD steps, so that the Hessian has the outliers of a trained network."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    opt.zero_grad(set_to_none=True)


def seeded(fn: Callable) -> Callable:
    """``fn`` with torch's global generator (PyHessian's source of random vectors) reseeded first."""

    def run():
        torch.manual_seed(0)
        return fn()

    return run


def clock(fn: Callable, device: torch.device) -> tuple[float, object]:
    """Wall time of one call (synchronising the GPU around it) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=sorted(IMAGE_SIZE), default="cnn", help="see the module docstring")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20, help="Lanczos / power iterations")
    parser.add_argument("--slq-iters", type=int, default=30)
    parser.add_argument("--slq-starts", type=int, default=1)
    parser.add_argument("--reference-iters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()
    info = run_info("bench_hessian")  # before the runs: the code they import is the code of this moment

    from pyhessian import hessian as PyHessian
    from pyhessian.utils import hessian_vector_product, normalization

    torch.eig = _eig_shim  # type: ignore[attr-defined]  # see the module docstring
    warnings.filterwarnings("ignore", message=".*create_graph=True.*")

    device = torch.device(args.device)
    torch.manual_seed(0)
    size = IMAGE_SIZE[args.model]
    data = make_data(args.batches, args.batch_size, size=size)
    model = make_model(args.model)
    train_briefly(model, data)
    model = model.to(device)
    data = [(x.to(device), y.to(device)) for x, y in data]
    num_params = sum(p.numel() for p in model.parameters())
    single = args.batches == 1
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    )

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    def pyhessian():
        m = copy.deepcopy(model)
        kwargs = {"data": data[0]} if single else {"dataloader": data}
        return PyHessian(m, nn.CrossEntropyLoss(), cuda=device.type == "cuda", **kwargs)

    def ours(dtype=None, cache=None):
        return HessianOperator(model, loss_fn, data, dtype=dtype, cache_graphs=cache)

    ref = top_eigenpairs(ours(torch.float64), 5, num_iters=args.reference_iters)
    ref_top = ref.eigenvalues.tolist()
    print(
        f"model: {args.model}, {num_params} parameters; data: {args.batches} x {args.batch_size} "
        f"images 3x{size}x{size}; device: {device} ({device_name}, {torch.get_num_threads()} threads); "
        f"torch {torch.__version__}"
    )
    print(
        f"reference (float64 Lanczos, {args.reference_iters} iterations): top-5 = "
        + ", ".join(f"{v:.6g}" for v in ref_top)
        + f"; max Ritz residual {float(ref.residuals.max()):.1e}"
    )

    # Warm-up: one product each (allocator, autograd, first-call overheads).
    ours().matvec(torch.randn(num_params, device=device))
    seeded(lambda: pyhessian().eigenvalues(maxIter=1, top_n=1))()

    # One batch: graphs cached on both sides. Several: recomputed on both sides, and ours cached too.
    variants = [("sharpness", None)] + ([] if single else [("sharpness, cached graphs", True)])
    n, k, s = args.iters, args.slq_iters, args.slq_starts
    # (task, implementation, HVPs, run, eigenvalues of its result); the operator or PyHessian object
    # is built inside the timed call, as a user would. Our Lanczos runs as by default, with one
    # extra product per eigenvalue for its explicit (float32) Ritz residuals.
    # fmt: off
    jobs: list[tuple[str, str, int | Callable, Callable, Callable]] = []

    def add(task: str, impl: str, hvps: int | Callable, run: Callable, values: Callable) -> None:
        jobs.append((task, impl, hvps, run, values))

    def lanczos_hvps(r) -> int:
        return r.num_iters + (len(r.eigenvalues) if r.residual_kind == "explicit" else 0)

    add("top-1", "PyHessian power iteration", n,
        seeded(lambda: pyhessian().eigenvalues(maxIter=n, tol=0.0, top_n=1)), lambda r: r[0])
    for name, c in variants:
        add("top-1", f"{name} power iteration", n,
            lambda c=c: power_iteration(ours(cache=c), max_iters=n, tol=0.0), lambda r: [r.eigenvalue])
        add("top-1", f"{name} Lanczos", lanczos_hvps,
            lambda c=c: top_eigenpairs(ours(cache=c), 1, num_iters=n), lambda r: r.eigenvalues.tolist())
    add("top-5", "PyHessian power iteration + deflation", 5 * n,
        seeded(lambda: pyhessian().eigenvalues(maxIter=n, tol=0.0, top_n=5)), lambda r: r[0])
    for name, c in variants:
        add("top-5", f"{name} Lanczos", lanczos_hvps,
            lambda c=c: top_eigenpairs(ours(cache=c), 5, num_iters=n), lambda r: r.eigenvalues.tolist())
    add("density", "PyHessian SLQ", k * s,
        seeded(lambda: pyhessian().density(iter=k, n_v=s)), lambda r: [max(max(x) for x in r[0])])
    for name, c in variants:
        add("density", f"{name} SLQ", k * s,
            lambda c=c: spectral_density(ours(cache=c), num_starts=s, num_iters=k),
            lambda r: [max(float(x.max()) for x in r.nodes)])

    # Per product, on objects built once: n products of the same unit vector each.
    ph = seeded(pyhessian)()
    torch.manual_seed(0)
    ph_v = normalization([torch.randn(p.size(), device=device) for p in ph.params])
    if single:
        ph_product = lambda: hessian_vector_product(ph.gradsH, ph.params, ph_v)  # noqa: E731
    else:
        ph_product = lambda: ph.dataloader_hv_product(ph_v)  # noqa: E731
    products: list[tuple[str, Callable]] = [("PyHessian", ph_product)]
    for name, c in variants:
        op = ours(cache=c)
        v = torch.nn.functional.normalize(torch.randn(num_params, device=device), dim=0)
        products.append((name, lambda op=op, v=v: op.matvec(v)))
    # fmt: on

    # Repeats run round-robin, so that a change of load on a shared machine hits every job alike.
    best = [float("inf")] * len(jobs)
    results: list[object] = [None] * len(jobs)
    per_hvp = [float("inf")] * len(products)
    for _ in range(args.repeats):
        for i, (_, _, _, run, _) in enumerate(jobs):
            seconds, results[i] = clock(run, device)
            best[i] = min(best[i], seconds)
        for i, (_, product) in enumerate(products):
            seconds, _ = clock(lambda product=product: [product() for _ in range(n)], device)
            per_hvp[i] = min(per_hvp[i], seconds / n)
    rows = []
    for (task, impl, hvps, _, values_of), seconds, result in zip(jobs, best, results, strict=True):
        values = [float(v) for v in values_of(result)]
        err = max(abs(v - r) / abs(r) for v, r in zip(values, ref_top, strict=False))
        hvps = hvps(result) if callable(hvps) else hvps
        rows.append({"task": task, "library": impl, "seconds": seconds, "hvps": hvps, "eigenvalues": values,
                     "max_rel_error": err})  # fmt: skip

    print("\n| task | implementation | time (s) | HVPs | max rel. error | eigenvalues |")
    print("|---|---|---:|---:|---:|---|")
    for r in rows:
        values = ", ".join(f"{v:.5g}" for v in r["eigenvalues"])
        print(
            f"| {r['task']} | {r['library']} | {r['seconds']:.3f} | {r['hvps']} | {r['max_rel_error']:.1e} | {values} |"
        )
    print("(density: the eigenvalue is the largest SLQ node, compared with the reference lambda_max)")
    print(f"\n| per product ({n} products, best of {args.repeats}) | ms per HVP |")
    print("|---|---:|")
    for (impl, _), seconds in zip(products, per_hvp, strict=True):
        print(f"| {impl} | {1000 * seconds:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    **info,
                    "args": vars(args),
                    "torch": torch.__version__,
                    "device_name": device_name,
                    "num_params": num_params,
                    "reference": ref_top,
                    "reference_max_residual": float(ref.residuals.max()),
                    "rows": rows,
                    "ms_per_hvp": {impl: 1000 * t for (impl, _), t in zip(products, per_hvp, strict=True)},
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
