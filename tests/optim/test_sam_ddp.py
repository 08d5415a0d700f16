"""SAM under DistributedDataParallel (2 CPU processes, gloo on 127.0.0.1).

Per-replica perturbations (the documented recipe): the clean pass runs under ``no_sync()`` (forward and backward),
so each replica computes eps-hat from its local gradient (the paper's m-sharpness with m = the per-replica batch);
the perturbed pass is all-reduced as usual and the base optimizer applies the averaged gradient on every replica.
Global perturbations: the clean pass is all-reduced too, and the run is one process's SAM on the whole batch.
"""

from __future__ import annotations

import contextlib
import math
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from sharpness import SAM
from sharpness.optim import AESAM, MSAM, LookSAM
from sharpness.optim.perturbation import perturbation

from ._distributed import WORLD, host_reads, run_once

RHO, LR, STEPS = 0.1, 0.5, 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _data(rank, step=0):
    gen = torch.Generator().manual_seed(100 + rank + 10 * step)
    return torch.randn(10, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,), generator=gen)


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def _ddp_run(rank, mode, steps, process_group=None):
    """``steps`` steps of SAM(SGD) on DDP; ``mode`` per_replica runs the clean pass under no_sync()."""
    model = DDP(_model(), process_group=process_group)
    params = list(model.parameters())
    opt = SAM(params, _sgd(params), rho=RHO, model=model, perturbation=mode, process_group=process_group)
    for step in range(steps):
        x, y = _data(rank, step)
        with model.no_sync() if opt.clean_pass_no_sync else contextlib.nullcontext():
            F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return [p.detach().clone() for p in model.parameters()], opt.clean_pass_no_sync


def _skip_run(rank):
    """Rank 1's clean loss is inf; its perturbed pass then runs at NaN weights, which ``nan_to_num`` on the logits
    hides from the all-reduced gradient: only the flag of the clean pass says the step must be skipped."""
    model = DDP(torch.nn.Linear(6, 3).double())
    params = list(model.parameters())
    opt = SAM(params, _sgd(params), rho=RHO, model=model)
    start = [p.detach().clone() for p in params]
    x, y = _data(rank)
    with model.no_sync():
        loss = F.cross_entropy(model(x).nan_to_num(0.0), y)
        (loss * (math.inf if rank == 1 else 1.0)).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x).nan_to_num(0.0), y).backward()
    finite_perturbed = all(bool(torch.isfinite(p.grad).all()) for p in params)
    opt.second_step(zero_grad=True)
    return {
        "unchanged": all(torch.equal(p, s) for p, s in zip(params, start, strict=True)),
        "weights": [p.detach().clone() for p in params],
        "skipped_steps": int(opt.skipped_steps),
        "finite_perturbed_gradient": finite_perturbed,
    }


def _host_reads_run(rank):
    """The host reads in SAM's part of a step after the first, with fused AdamW (which skips on the device): the
    flag's all-reduce adds none."""
    model = DDP(_model())
    params = list(model.parameters())
    opt = SAM(params, torch.optim.AdamW(params, lr=0.01, fused=True), rho=RHO, model=model)
    reads = []
    for step in range(STEPS):
        x, y = _data(rank, step)
        with model.no_sync():
            F.cross_entropy(model(x), y).backward()
        with host_reads() as first:
            opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        with host_reads() as second:
            opt.second_step(zero_grad=True)
        if step:
            reads += first + second
    return reads


def _worker(rank):
    return {
        "host_reads": _host_reads_run(rank),
        "per_replica_one_step": _ddp_run(rank, "per_replica", 1)[0],
        "per_replica": _ddp_run(rank, "per_replica", STEPS, process_group=dist.new_group([0, 1])),
        "global": _ddp_run(rank, "global", STEPS),
        "skip": _skip_run(rank),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    try:
        return run_once("sam_ddp", _worker, tmp_path_factory)
    except Exception:
        pytest.fail(traceback.format_exc(), pytrace=False)


def _close(got, want):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_each_replica_perturbs_with_its_local_gradient(runs):
    model = _model()
    grads_at_perturbed = []
    for rank in range(WORLD):
        x, y = _data(rank)
        w = [p.detach().clone().requires_grad_() for p in model.parameters()]
        g = torch.autograd.grad(
            F.cross_entropy(
                torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), w, strict=True)), (x,)), y
            ),
            w,
        )
        eps = perturbation(list(g), RHO).eps
        shifted = [(a + b).detach().requires_grad_() for a, b in zip(w, eps, strict=True)]
        loss = F.cross_entropy(
            torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), shifted, strict=True)), (x,)), y
        )
        grads_at_perturbed.append(torch.autograd.grad(loss, shifted))
    expected = [
        p.detach() - LR * (a + b) / WORLD for p, a, b in zip(model.parameters(), *grads_at_perturbed, strict=True)
    ]
    for rank in range(WORLD):
        _close(runs[rank]["per_replica_one_step"], expected)


def test_per_replica_equals_one_process_m_sharpness(runs):
    """m-sharpness on one process (``next_subset``, m = the per-replica batch), over several steps."""
    model = _model()
    params = list(model.parameters())
    opt = SAM(params, _sgd(params), rho=RHO, model=model)
    for step in range(STEPS):
        for rank in range(WORLD):
            if rank:
                opt.next_subset()
            x, y = _data(rank, step)
            (F.cross_entropy(model(x), y) / WORLD).backward()
            opt.first_step(zero_grad=True)
            (F.cross_entropy(model(x), y) / WORLD).backward()
        opt.second_step(zero_grad=True)
    for rank in range(WORLD):
        weights, no_sync = runs[rank]["per_replica"]
        assert no_sync is True
        _close(weights, [p.detach() for p in params])


def test_global_equals_one_process_sam_on_the_whole_batch(runs):
    model = _model()
    params = list(model.parameters())
    opt = SAM(params, _sgd(params), rho=RHO, model=model)
    for step in range(STEPS):
        x, y = (torch.cat(parts) for parts in zip(*(_data(rank, step) for rank in range(WORLD)), strict=True))

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
    for rank in range(WORLD):
        weights, no_sync = runs[rank]["global"]
        assert no_sync is False
        _close(weights, [p.detach() for p in params])
    # and it is not the per-replica run
    global_, per_replica = runs[0]["global"][0], runs[0]["per_replica"][0]
    assert max((a - b).abs().max().item() for a, b in zip(global_, per_replica, strict=True)) > 1e-6


def test_inf_on_one_replica_skips_the_step_on_every_replica(runs):
    for rank in range(WORLD):
        skip = runs[rank]["skip"]
        assert skip["finite_perturbed_gradient"], "the scenario must hide the inf from the all-reduced gradient"
        assert skip["unchanged"], f"rank {rank} stepped"
        assert skip["skipped_steps"] == 1
    _close(runs[0]["skip"]["weights"], runs[1]["skip"]["weights"])


def test_the_skip_flag_all_reduce_reads_nothing_on_the_host(runs):
    assert runs[0]["host_reads"] == [] and runs[1]["host_reads"] == []


# ---------------------------------------------------------------------------------------------------- one process
def test_clean_pass_no_sync_follows_the_scheme_and_the_schedule():
    model = _model()
    x, y = _data(0)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def make(cls, **options):
        return cls(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, **options)

    assert make(SAM).perturbation == "per_replica"
    assert make(SAM).clean_pass_no_sync is True
    assert make(SAM, perturbation="global").clean_pass_no_sync is False
    assert make(MSAM).clean_pass_no_sync is False  # its one pass is at the perturbed point
    assert make(AESAM).clean_pass_no_sync is True  # decided by the gradient: no_sync, then averaged if it does not
    look = make(LookSAM, k=2)
    answers = []
    for _ in range(3):
        answers.append(look.clean_pass_no_sync)
        look.step(closure)
        look.zero_grad()
    assert answers == [True, False, True]


def test_perturbation_is_one_of_two_schemes():
    with pytest.raises(ValueError, match="perturbation must be one of"):
        SAM(_model().parameters(), torch.optim.SGD, lr=LR, perturbation="local")
