"""SAM on parameters sharded by FSDP2 (``fully_shard``): 2 CPU processes, gloo backend on 127.0.0.1.

    python examples/fsdp.py

The recipe, per batch on every rank (each on its own share of the batch):

    criterion(model(x), y).backward()                   # clean pass, synchronised (no no_sync: see below)
    opt.first_step(zero_grad=True)                      # eps-hat: its norm is all-reduced over the shards
    criterion(model(x), y).backward()                   # perturbed pass
    opt.second_step(zero_grad=True)                     # restore w, base step on the local shards

Each rank stores a shard of every parameter (a DTensor), and FSDP hands back gradients already averaged over all
ranks: eps-hat is the *global* one, as one process would compute on the whole batch, with rho meaning what it means
on one device. A per-replica eps-hat (DDP's recipe) is not defined here, since no rank holds all of w:
``SAM(..., perturbation="per_replica")`` raises. Nor may the clean pass run with FSDP's gradient synchronisation
off: FSDP would keep that gradient in private buffers and add it into the perturbed pass's (``first_step()``
raises when it finds no gradient). Pass ``model=`` (the root FSDP module): SAM restores the BatchNorm statistics
and reshards the modules around the perturbed pass.

``opt.state_dict()`` holds each rank's shards (DTensors): save one file per rank, as for any FSDP optimizer.
With ``torchrun`` instead of ``mp.spawn``, ``worker`` is the body of your script (rank from the environment).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from sharpness import SAM
from sharpness.optim import global_norm

WORLD, EPOCHS, BATCH, RHO = 2, 3, 64, 0.05


def synthetic_data(seed: int = 0):
    """A 5-class problem labelled by a random linear teacher: 1200 training and 400 test points in 20 dimensions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1600, 20, generator=gen)
    y = (x @ torch.randn(20, 5, generator=gen)).argmax(1)
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


def worker(rank: int, port: int) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        (x_train, y_train), (x_test, y_test) = synthetic_data()
        x_local, y_local = x_train[rank::WORLD], y_train[rank::WORLD]  # this rank's share

        torch.manual_seed(0)  # the same full weights on every rank before sharding
        model = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 5))
        for layer in (model[0], model[3]):
            fully_shard(layer)
        fully_shard(model)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model, lr=0.1, momentum=0.9)
        held = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        print(f"rank {rank} holds {held} of the {total} parameters", flush=True)

        gen = torch.Generator().manual_seed(rank)
        for epoch in range(EPOCHS):
            loss_sum = 0.0
            for step, idx in enumerate(torch.randperm(len(y_local), generator=gen).split(BATCH)):
                x, y = x_local[idx], y_local[idx]
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                if epoch == 0 and step == 0:
                    w = [p.detach().clone() for p in model.parameters()]
                opt.first_step(zero_grad=True)
                if epoch == 0 and step == 0:
                    # the norm over every shard of every parameter (DTensors: all-reduced), the same on each rank
                    eps_norm = global_norm([p.detach() - c for p, c in zip(model.parameters(), w, strict=True)])
                    assert abs(eps_norm.item() - RHO) < 1e-6, eps_norm
                    if rank == 0:
                        print(f"||eps-hat|| over all shards: {eps_norm.item():.6f} (rho = {RHO})")
                F.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=True)
                loss_sum += loss.item() * len(idx)
            if rank == 0:
                print(f"epoch {epoch + 1}: rank 0's mean training loss {loss_sum / len(y_local):.4f}")

        model.eval()  # every rank runs the forward: FSDP gathers the shards
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        if rank == 0:
            print(f"test accuracy {acc:.3f}; skipped steps {int(opt.skipped_steps)}")
            assert acc > 0.85, f"test accuracy {acc:.3f} is too low"
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD, join=True)  # raises if a worker fails
    print("OK: 2-process FSDP2 with SAM, eps-hat normed over all shards")


if __name__ == "__main__":
    main()
