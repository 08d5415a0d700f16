"""SAM under DistributedDataParallel: 2 CPU processes, gloo backend on 127.0.0.1.

    python examples/ddp.py

The recipe, per batch on every replica:

    with model.no_sync():                               # clean pass: forward AND backward, no all-reduce
        criterion(model(x), y).backward()
    opt.first_step(zero_grad=True)                      # eps-hat from this replica's local gradient
    criterion(model(x), y).backward()                   # perturbed pass: gradients all-reduced as usual
    opt.second_step(zero_grad=True)                     # same averaged gradient, same update on every replica

Each replica perturbs its own weights with its own batch's gradient, as the paper does on several accelerators
(m-sharpness, Section 4.1, with m = the per-replica batch), and the clean pass costs no communication. Without
``no_sync()`` DDP would all-reduce the clean gradient too: one more all-reduce per step, and eps-hat from the
global batch (a larger m, which the paper finds generalises worse); that is the *global* scheme, which you ask
for with ``SAM(..., perturbation="global")`` (``opt.clean_pass_no_sync`` then says False). The forward must be
inside ``no_sync()`` as well: DDP decides at forward time whether the following backward synchronises. A
non-finite gradient on any replica skips the step on all of them (SAM all-reduces its skip flag).

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
from torch.nn.parallel import DistributedDataParallel as DDP

from sharpness import SAM

WORLD, EPOCHS, BATCH = 2, 3, 64


def synthetic_data(seed: int = 0):
    """A 5-class problem labelled by a random linear teacher: 1200 training and 400 test points in 20 dimensions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1600, 20, generator=gen)
    y = (x @ torch.randn(20, 5, generator=gen)).argmax(1)
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


def worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        (x_train, y_train), (x_test, y_test) = synthetic_data()
        x_local, y_local = x_train[rank::WORLD], y_train[rank::WORLD]  # this replica's shard

        torch.manual_seed(0)  # DDP also broadcasts rank 0's weights when it wraps the model
        model = DDP(nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 5)))
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1, momentum=0.9)

        gen = torch.Generator().manual_seed(rank)
        for epoch in range(EPOCHS):
            total = 0.0
            for step, idx in enumerate(torch.randperm(len(y_local), generator=gen).split(BATCH)):
                x, y = x_local[idx], y_local[idx]
                with model.no_sync():
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                if epoch == 0 and step == 0:
                    local_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
                    norms = [torch.zeros(()) for _ in range(WORLD)]
                    dist.all_gather(norms, local_norm)
                    # no_sync() worked: each replica holds the gradient of its own batch only
                    assert not torch.equal(norms[0], norms[1])
                    if rank == 0:
                        print("clean-pass gradient norms, per replica:", [f"{n.item():.4f}" for n in norms])
                opt.first_step(zero_grad=True)
                F.cross_entropy(model(x), y).backward()
                opt.second_step(zero_grad=True)
                total += loss.item() * len(idx)
            if rank == 0:
                print(f"epoch {epoch + 1}: rank 0's mean training loss {total / len(y_local):.4f}")

        # Different perturbations, same averaged update: the replicas stay bit-identical.
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], g) for g in gathered), "replicas diverged"
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        if rank == 0:
            print(f"replica weights identical after training; test accuracy {acc:.3f}")
            assert acc > 0.85, f"test accuracy {acc:.3f} is too low"
        dist.barrier()  # let both replicas finish before tearing the process group down
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD, join=True)  # raises if a worker fails
    print("OK: 2-process DDP with SAM, clean pass under no_sync(), replicas identical")


if __name__ == "__main__":
    main()
