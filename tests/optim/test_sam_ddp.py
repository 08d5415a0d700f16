"""SAM under DistributedDataParallel (2 CPU processes, gloo on 127.0.0.1).

The recipe: the clean pass runs under ``no_sync()`` (forward and backward), so each replica computes eps-hat
from its local gradient (the paper's m-sharpness with m = the per-replica batch); the perturbed pass is
all-reduced as usual and the base optimizer applies the averaged gradient on every replica.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from sharpness import SAM
from sharpness.optim.perturbation import perturbation

RHO, LR, WORLD = 0.1, 0.5, 2


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _data(rank):
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(10, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,), generator=gen)


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = DDP(_model())
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model, lr=LR)
        x, y = _data(rank)
        with model.no_sync():  # clean pass: local gradient, no all-reduce
            F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()  # perturbed pass: all-reduced
        opt.second_step(zero_grad=True)
        out[rank] = [p.detach().clone() for p in model.parameters()]
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_replica_perturbs_with_its_local_gradient():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)

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
        for got, want in zip(out[rank], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
