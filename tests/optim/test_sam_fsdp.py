"""SAM and its variants on FSDP2 (``fully_shard``; DTensor parameters), 2 CPU processes with gloo on 127.0.0.1.

Each rank trains on its half of every batch; FSDP averages the gradients over the ranks, so SAM's eps-hat is the
global one and the run must equal one process's SAM on the whole batch, with the loss the mean of the two halves'
(each its own forward: BatchNorm normalises each half by its own statistics, as each rank does). The models have
uneven shards and, on rank 1, empty ones (a tensor with one row).
"""

from __future__ import annotations

import copy
import io
import math
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpness.optim import AESAM, ESAM, GSAM, MSAM, SAM, FriendlySAM, IntervalSAM, LookSAM, RandomDirectionSAM, VaSSO

from ._distributed import WORLD, host_reads, run_once

STEPS, RHO = 3, 0.5  # a large radius, so that a wrong perturbation shows


def mlp() -> nn.Module:
    torch.manual_seed(0)  # 5 rows: shards of 3 and 2; 1 row: rank 1's shard is empty
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1), nn.Tanh(), nn.Linear(1, 3)).double()


def cnn() -> nn.Module:
    torch.manual_seed(0)  # no bias before BatchNorm: its true gradient is 0, and AdamW would amplify the rounding
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).double()


MODELS = {"mlp": mlp, "cnn": cnn}


def batches(model: str, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        shape = (8, 6) if model == "mlp" else (8, 2, 4, 4)
        out.append((torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)))
    return out


def shard(module: nn.Module, mesh=None, reshard_after_backward: bool = True) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    module = copy.deepcopy(module)
    for child in module.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    module = fully_shard(module, mesh=mesh)
    module.set_reshard_after_backward(reshard_after_backward)  # False: FSDP keeps the gathered weights
    return module


def sgd(params, **kw):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=True, **kw)


def adamw(params):
    return torch.optim.AdamW(params, lr=0.01, foreach=True)


def fused_adamw(params):  # SAM skips non-finite steps on the device (fused SGD has no DTensor rule in torch 2.13)
    return torch.optim.AdamW(params, lr=0.01, fused=True)


SAM_CASES = {
    "mlp-sgd-p2": ("mlp", sgd, {}),
    "mlp-sgd-pinf": ("mlp", sgd, {"p": math.inf}),
    "mlp-sgd-p3": ("mlp", sgd, {"p": 3.0}),  # the peak (inf-norm) of an empty shard
    "mlp-adamw-p2": ("mlp", adamw, {}),
    "mlp-fused_adamw-p2": ("mlp", fused_adamw, {}),
    "mlp-sgd-asam": ("mlp", sgd, {"adaptive": True}),
    "mlp-sgd-clip-ascent2": ("mlp", sgd, {"max_grad_norm": 0.05, "ascent_steps": 2}),
    "cnn-sgd-p2": ("cnn", sgd, {}),
    "cnn-adamw-pinf": ("cnn", adamw, {"p": math.inf}),
    "cnn-adamw-asam": ("cnn", adamw, {"adaptive": True}),
    "cnn-sgd-reshard_after_backward=False": ("cnn", sgd, {}),
    "mlp-sgd-hsdp(2,1)": ("mlp", sgd, {}),  # 2-D meshes: (replicate, shard)
    "mlp-sgd-hsdp(1,2)": ("mlp", sgd, {"p": 3.0}),
    "mlp-sgd-gradscaler": ("mlp", sgd, {"grad_scaler": True}),  # a power of 2: the same steps exactly
}

VARIANT_CASES = {
    "gsam": (GSAM, {"alpha": 0.4, "rho_min": 0.1, "lr_max": 0.2}),
    "looksam": (LookSAM, {"k": 2, "alpha": 0.7}),
    "friendly_sam": (FriendlySAM, {"sigma": 0.5, "lmbda": 0.8}),
    "friendly_sam-gradscaler": (FriendlySAM, {"sigma": 0.5, "lmbda": 0.8, "grad_scaler": True}),
    "vasso": (VaSSO, {"theta": 0.5}),
    "msam": (MSAM, {}),
    "interval": (IntervalSAM, {"k": 2}),
    "aesam": (AESAM, {"c_start": -3.0}),  # ascends on steps 0, 2, 3 of 4
    "esam-swp": (ESAM, {"beta": 0.6, "gamma": 1.0, "seed": 3}),
}


# ---------------------------------------------------------------------------------------------------- the loops
def halves_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One process, the whole batch: the mean of the two halves' losses."""

    def closure():
        model.zero_grad(set_to_none=True)
        loss = (
            sum(F.cross_entropy(model(xh), yh) for xh, yh in zip(x.chunk(WORLD), y.chunk(WORLD), strict=True)) / WORLD
        )
        loss.backward()
        return loss

    return closure


def esam_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure(index=None):
        xi, yi = (x, y) if index is None else (x[index], y[index])
        return F.cross_entropy(model(xi), yi, reduction="none")

    return closure


def fsdp_step(opt: SAM, model: nn.Module, x: torch.Tensor, y: torch.Tensor, scaler=None) -> list[torch.Tensor]:
    """This rank's half of the batch, in the manual two-pass form (under ``scaler``, a GradScaler, if given);
    returns the buffers as the clean pass left them (the step's only pass, for MSAM)."""
    scale = scaler.scale if scaler is not None else lambda loss: loss
    if isinstance(opt, ESAM):
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        clean = [b.clone() for b in model.buffers()]
        opt.first_step()
        with torch.no_grad():
            sharper = F.cross_entropy(model(x), y, reduction="none")
        keep = opt.select(losses.detach(), sharper)
        F.cross_entropy(model(x[keep]), y[keep]).backward()
    elif opt.perturbs_before_pass:
        opt.first_step()
        F.cross_entropy(model(x), y).backward()
        clean = [b.clone() for b in model.buffers()]
    else:
        scale(F.cross_entropy(model(x), y)).backward()
        clean = [b.clone() for b in model.buffers()]
        for _ in range(opt.ascent_steps):
            if not opt.first_step():
                break
            scale(F.cross_entropy(model(x), y)).backward()
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad(set_to_none=True)
    return clean


def reference_step(opt: SAM, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    if isinstance(opt, ESAM):
        opt.step(esam_closure(model, x, y))
    else:
        opt.step(halves_closure(model, x, y))
    opt.zero_grad(set_to_none=True)


def gap(sharded: nn.Module, reference: nn.Module) -> float:
    from torch.distributed.fsdp import FSDPModule

    for module in sharded.modules():  # the sharded parameters, also if FSDP still holds gathered ones
        if isinstance(module, FSDPModule):
            module.reshard()
    return max(
        (p.full_tensor() - q).abs().max().item()
        for p, q in zip(sharded.parameters(), reference.parameters(), strict=True)
    )


def against_one_process(rank: int, make, model_name: str, base, options: dict, steps: int = STEPS, **shard_kw):
    """max |w_fsdp - w_one_process| after ``steps`` steps, and whether the buffers ended as each clean pass left
    them."""
    options = dict(options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if options.pop("grad_scaler", False) else None
    reference = MODELS[model_name]()
    sharded = shard(reference, **shard_kw)
    params, ref_params = list(sharded.parameters()), list(reference.parameters())
    opt = make(params, base(params), rho=RHO, model=sharded, grad_scaler=scaler, **options)
    ref_opt = make(ref_params, base(ref_params), rho=RHO, model=reference, **options)
    restored = True
    for x, y in batches(model_name, steps):
        clean = fsdp_step(opt, sharded, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank], scaler)
        restored &= all(torch.equal(a, b) for a, b in zip(clean, sharded.buffers(), strict=True))
        reference_step(ref_opt, reference, x, y)
    return {"gap": gap(sharded, reference), "buffers_restored": restored, "opt": opt}


# ---------------------------------------------------------------------------------------------------- the worker
def _worker(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    results: dict = {}
    for name, (model_name, base, options) in SAM_CASES.items():
        shard_kw = {}
        if "reshard_after_backward" in name:
            shard_kw = {"reshard_after_backward": False}
        if "hsdp" in name:
            shape = (2, 1) if "(2,1)" in name else (1, 2)
            shard_kw = {"mesh": init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))}
        run = against_one_process(rank, SAM, model_name, base, options, **shard_kw)
        results[name] = {"gap": run["gap"], "buffers_restored": run["buffers_restored"]}
        if name == "mlp-sgd-p2":
            opt = run["opt"]
            results["state"] = {
                "skipped_steps": type(opt.skipped_steps).__name__,
                "last_step_skipped": type(opt.last_step_skipped).__name__,
                "copies": [
                    (
                        opt._w.of(p).to_local().numel(),
                        p.to_local().numel(),
                        opt._w.of(p).to_local().untyped_storage().nbytes(),
                    )
                    for p in opt._w.keys
                ],
                "copies_are_dtensors": all(type(opt._w.of(p)).__name__ == "DTensor" for p in opt._w.keys),
                "itemsize": 8,
            }

    for name, (cls, options) in VARIANT_CASES.items():
        steps = 4 if cls in (LookSAM, IntervalSAM, AESAM) else STEPS
        run = against_one_process(rank, cls, "mlp", sgd, options, steps=steps)
        results[name] = {"gap": run["gap"]}
        if name == "looksam":
            opt = run["opt"]
            gv = opt._gv.current
            results["looksam-state"] = [
                (type(t).__name__, t.to_local().numel(), p.to_local().numel()) for p, t in gv.items()
            ]
            results["clean-copies"] = [
                (opt._clean.of(p).to_local().numel(), p.to_local().numel()) for p in opt._clean.keys
            ]

    results["skip"] = _skip(rank)
    results["host_reads"] = _host_reads(rank)
    results["random_direction"] = _random_direction(rank)
    results["state_dict"] = _state_dict_round_trip(rank)
    results["errors"] = _errors(rank, init_device_mesh)
    return results


def _skip(rank: int) -> dict:
    """A normal step, then one whose clean loss is inf on rank 1 only (fused AdamW: skipped on the device)."""
    model = shard(mlp())
    params = list(model.parameters())
    opt = SAM(params, fused_adamw(params), rho=RHO, model=model)
    (x0, y0), (x1, y1) = batches("mlp", 2)
    fsdp_step(opt, model, x0.chunk(WORLD)[rank], y0.chunk(WORLD)[rank])
    before = [p.full_tensor() for p in params]
    x, y = x1.chunk(WORLD)[rank], y1.chunk(WORLD)[rank]
    (F.cross_entropy(model(x), y) * (math.inf if rank == 1 else 1.0)).backward()
    opt.first_step()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return {
        "unchanged": all(torch.equal(p.full_tensor(), b) for p, b in zip(params, before, strict=True)),
        "skipped_steps": int(opt.skipped_steps),
    }


def _host_reads(rank: int) -> dict:
    """The host reads in SAM's part of a step (first_step, step) after the first, with fused AdamW (which skips on
    the device): eq. 2, clipping, the skip check and GSAM's inner products reduce over the shards without any."""
    out = {}
    for name, cls, options in (("sam", SAM, {"p": 3.0, "max_grad_norm": 1.0}), ("gsam", GSAM, {})):
        model = shard(mlp())
        params = list(model.parameters())
        opt = cls(params, fused_adamw(params), rho=RHO, model=model, **options)
        reads = []
        for step, (x, y) in enumerate(batches("mlp")):
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
            F.cross_entropy(model(x), y).backward()
            with host_reads() as first:
                opt.first_step()
            F.cross_entropy(model(x), y).backward()
            with host_reads() as second:
                opt.step()
            opt.zero_grad()
            if step:
                reads += first + second
        out[name] = reads
    return out


def _random_direction(rank: int) -> dict:
    model = shard(mlp())
    params = list(model.parameters())
    opt = RandomDirectionSAM(params, sgd(params), rho=RHO, model=model, seed=5)
    before = [p.full_tensor() for p in model.parameters()]
    opt.first_step()
    eps = [p.full_tensor() - b for p, b in zip(model.parameters(), before, strict=True)]
    opt.abort_step()
    first = eps[0]  # Linear(6, 5).weight: rows 0-2 on rank 0, rows 3-4 on rank 1
    return {
        "norm": torch.cat([e.flatten() for e in eps]).norm().item(),
        "ranks_differ": not torch.allclose(first[0], first[3], rtol=0, atol=1e-9),  # same stream: equal to 1e-16
        "restored": all(torch.equal(p.full_tensor(), b) for p, b in zip(model.parameters(), before, strict=True)),
    }


def _state_dict_round_trip(rank: int) -> dict:
    """FriendlySAM (an EMA of the gradients) with SGD momentum: 2 steps, save, 2 more; against a fresh optimizer
    loading the saved state (torch.save/torch.load, one file per rank) on a model at the same weights."""
    data = batches("mlp", 4)
    reference = mlp()

    def run(model, opt, steps):
        for x, y in steps:
            fsdp_step(opt, model, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])

    def make(model):
        params = list(model.parameters())
        return FriendlySAM(params, sgd(params), rho=RHO, model=model, sigma=0.5)

    a = shard(reference)
    opt_a = make(a)
    run(a, opt_a, data[:2])
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    run(a, opt_a, data[2:])

    b = shard(reference)
    run(b, make(b), data[:2])
    opt_b = make(b)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    opt_b.load_state_dict(state)
    run(b, opt_b, data[2:])
    average = state["sam"]["variant"]["average"]
    return {
        "gap": max(
            (p.full_tensor() - q.full_tensor()).abs().max().item()
            for p, q in zip(a.parameters(), b.parameters(), strict=True)
        ),
        "saved_as": sorted({type(t).__name__ for t in average.values()}),
    }


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _errors(rank: int, init_device_mesh) -> dict:
    hsdp = shard(mlp(), mesh=init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard")))
    fsdp = shard(mlp())
    x, y = batches("mlp", 1)[0]
    mine = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]

    SGD = torch.optim.SGD

    def no_sync_clean_pass():
        model = shard(mlp())
        opt = SAM(model.parameters(), SGD, rho=RHO, model=model, lr=0.1)
        model.set_requires_gradient_sync(False)
        F.cross_entropy(model(mine[0]), mine[1]).backward()
        opt.first_step()

    plain = nn.Linear(2, 2).double()
    return {
        "hsdp_per_replica": _error(lambda: SAM(hsdp.parameters(), SGD, lr=0.1, perturbation="per_replica")),
        "fsdp_per_replica": _error(lambda: GSAM(fsdp.parameters(), SGD, lr=0.1, perturbation="per_replica")),
        "hsdp_global": _error(lambda: SAM(hsdp.parameters(), SGD, lr=0.1, perturbation="global")),
        "second_order": _error(lambda: SAM(fsdp.parameters(), SGD, lr=0.1, second_order=True)),
        "mixed": _error(lambda: SAM([*fsdp.parameters(), *plain.parameters()], SGD, lr=0.1)),
        "no_gradient": _error(no_sync_clean_pass),
        "default_perturbation": SAM(fsdp.parameters(), SGD, lr=0.1).perturbation,
        "clean_pass_no_sync": SAM(fsdp.parameters(), SGD, lr=0.1).clean_pass_no_sync,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    try:
        return run_once("sam_fsdp", _worker, tmp_path_factory)
    except Exception:  # the worker's traceback, shown in every test of the module
        pytest.fail(traceback.format_exc(), pytrace=False)


# ---------------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("case", list(SAM_CASES))
def test_sam_on_fsdp_equals_one_process(runs, case):
    for rank, results in enumerate(runs):
        assert results[case]["gap"] < 1e-12, f"rank {rank}: {results[case]}"
        assert results[case]["buffers_restored"], f"rank {rank}"


@pytest.mark.parametrize("case", list(VARIANT_CASES))
def test_variant_on_fsdp_equals_one_process(runs, case):
    for rank, results in enumerate(runs):
        assert results[case]["gap"] < 1e-12, f"rank {rank}: {results[case]}"


def test_copies_of_w_are_local_shards(runs):
    for results in runs:
        state = results["state"]
        assert state["copies_are_dtensors"]
        for copy_numel, shard_numel, nbytes in state["copies"]:
            assert copy_numel == shard_numel
            assert nbytes == shard_numel * state["itemsize"]  # no unsharded storage behind the copy
    assert any(numel == 0 for _, numel, _ in runs[1]["state"]["copies"])  # the case of an empty shard is covered


def test_variant_state_and_clean_copies_are_local_shards(runs):
    for results in runs:
        assert results["looksam-state"] and results["clean-copies"]
        for kind, numel, shard_numel in results["looksam-state"]:
            assert kind == "DTensor" and numel == shard_numel
        for numel, shard_numel in results["clean-copies"]:
            assert numel == shard_numel


def test_skip_counters_stay_plain_tensors(runs):
    for results in runs:
        assert results["state"]["skipped_steps"] == "Tensor"
        assert results["state"]["last_step_skipped"] == "Tensor"


def test_inf_on_one_rank_skips_the_step_on_both(runs):
    for results in runs:
        assert results["skip"] == {"unchanged": True, "skipped_steps": 1}


def test_no_host_read_in_the_step(runs):
    for results in runs:
        assert results["host_reads"] == {"sam": [], "gsam": []}


def test_random_direction_on_fsdp(runs):
    for results in runs:
        rd = results["random_direction"]
        assert abs(rd["norm"] - RHO) < 1e-12
        assert rd["ranks_differ"], "both ranks drew the same noise for their shards"
        assert rd["restored"]


def test_state_dict_round_trips_per_rank(runs):
    for results in runs:
        assert results["state_dict"]["gap"] == 0.0
        assert results["state_dict"]["saved_as"] == ["DTensor"]


def test_unsupported_requests_raise_one_clear_error(runs):
    errors = runs[0]["errors"]
    expected = {
        "hsdp_per_replica": "ValueError: perturbation='per_replica' (one eps-hat per HSDP replica group)",
        "fsdp_per_replica": "ValueError: perturbation='per_replica' is not defined under FSDP",
        "second_order": "ValueError: second_order=True is not supported on FSDP2",
        "mixed": "ValueError: SAM's parameters mix DTensors (FSDP2) and plain tensors",
        "no_gradient": "RuntimeError: first_step() found no gradient on the FSDP-sharded parameters",
    }
    for name, start in expected.items():
        assert errors[name].startswith(start), errors[name]
    assert errors["hsdp_global"] == "no error"
    assert errors["default_perturbation"] == "global"
    assert errors["clean_pass_no_sync"] is False
    assert runs[1]["errors"] == errors
