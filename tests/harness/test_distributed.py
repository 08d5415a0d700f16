"""Data-parallel training under torchrun (2 CPU processes, gloo on 127.0.0.1): what each rank computes, that rank 0
alone writes, exact kill/resume, inf on one rank, and FSDP2 with the base optimizer."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from sharpness.cli.main import main
from sharpness.harness.config import ConfigError, load_config
from sharpness.harness.distributed import World, check_config
from sharpness.harness.loader import DeviceData
from sharpness.harness.seeds import STREAMS, epoch_seed
from sharpness.harness.train import Trainer

# 4 global batches of 64 per epoch; no augmentation (each rank has its own stream) and no BatchNorm (it normalises
# over each rank's examples, not the whole batch), so that both ranks together compute one process's step.
TINY = [
    "train_subset=256",
    "batch_size=64",
    "model=mlp",
    "model_kwargs={hidden: 16}",
    "augment=none",
    "device=cpu",
    "epochs=2",
    "schedule=constant",
]
TIMEOUT = 240  # seconds per torchrun job, far above its ~10 s, so that a hang fails instead of stalling the suite

# Runs under torchrun: trains each scenario of the JSON list argv[2] ([name, kind, overrides]) in argv[1]/runs/name
# and saves every rank's final parameters (and what the kinds record) to argv[1]/results/rank<r>.pt. Kind "cli"
# runs `sharpness <overrides>` with --out argv[1]/runs/name.
_SCENARIOS = r"""
import json, math, os, sys
from pathlib import Path
import torch
from sharpness.cli.main import main
from sharpness.harness.config import load_config
from sharpness.harness.train import Interrupted, Trainer, TrainingDiverged

out, scenarios = Path(sys.argv[1]), json.loads(sys.argv[2])
rank = int(os.environ["RANK"])


class Poisoned(Trainer):
    # Rank 1 multiplies its losses of global step 3 (1-based) by inf; each rank records what SAM reported.
    steps, skipped = 0, []

    def _step(self, images, labels, acc):
        self.steps += 1
        super()._step(images, labels, acc)

    def _loss(self, x, y, reduction="mean"):
        loss, logits = super()._loss(x, y, reduction)
        return (loss * math.inf if rank == 1 and self.steps == 3 else loss), logits

    def _after_step(self, loss, logits, labels, acc, skipped):
        self.skipped = self.skipped + [skipped is not None and bool(skipped)]
        super()._after_step(loss, logits, labels, acc, skipped)


class StopsAfterOneEpoch(Trainer):  # as if SIGTERM arrived on rank 1 alone at the end of epoch 1
    def _end_epoch(self, *args, **kwargs):
        self._stop = rank == 1
        return super()._end_epoch(*args, **kwargs)


def weights(trainer):
    full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v
    return {k: full(v.detach()).clone() for k, v in trainer.model.named_parameters()}


results = {}
for name, kind, overrides in scenarios:
    run = out / "runs" / name
    if kind == "cli":
        results[name] = main([*overrides, "--out", str(run)])
        continue
    config = load_config("demo-digits", overrides)
    if kind == "run":
        trainer = Trainer(config, run, progress=False)
        trainer.run()
        results[name] = weights(trainer)
    elif kind == "poison":
        trainer = Poisoned(config, run, progress=False)
        try:
            trainer.run()
            results[name] = {"weights": weights(trainer), "skipped": trainer.skipped}
        except TrainingDiverged as exc:
            results[name] = {"diverged": str(exc), "skipped": trainer.skipped}
    elif kind == "stop_resume":
        try:
            StopsAfterOneEpoch(config, run, progress=False).run()
        except Interrupted as exc:
            stopped = str(exc)
        trainer = Trainer(config, run, progress=False)
        trainer.run(resume=True)
        results[name] = {"weights": weights(trainer), "stopped": stopped}
(out / "results").mkdir(exist_ok=True)
torch.save(results, out / "results" / f"rank{rank}.pt")
"""

# Runs `sharpness <args>` under torchrun with Trainer._step held on every rank before global step N (1-based) until
# a stop signal arrives (or two minutes pass), after writing its pid to MARKER-<rank>: a kill that lands at a known
# step (torchrun starts each rank in a session of its own, so the test kills the job by these pids).
_PAUSE_AT_STEP = r"""
import os, sys, time
from pathlib import Path
from sharpness.cli.main import main
from sharpness.harness.train import Trainer

pause_at, marker = int(sys.argv[1]), Path(f"{sys.argv[2]}-{os.environ['RANK']}")
original, count = Trainer._step, [0]

def step(self, *args):
    count[0] += 1
    if count[0] == pause_at:
        marker.write_text(str(os.getpid()))
        deadline = time.time() + 120
        while not self._stop and time.time() < deadline:
            time.sleep(0.01)
    return original(self, *args)

Trainer._step = step
sys.exit(main(sys.argv[3:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _torchrun(nproc: int, *args: str) -> list[str]:
    """``torchrun --nproc-per-node N ARGS`` on one node, its store on 127.0.0.1 at a free port."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc)]
    return [*launcher, "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _metric_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("seconds", "cpu_seconds")} for line in lines]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


def _reference(tmp_path: Path, name: str, overrides: list[str], trainer: type[Trainer] = Trainer) -> Path:
    """One process's run of ``overrides``."""
    run = tmp_path / "reference" / name
    trainer(load_config("demo-digits", overrides), run, progress=False).run()
    return run


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def _train_overrides(epochs: int) -> list[str]:
    """A run with per-rank augmentation streams (Cutout) and BatchNorm, for the kill and resume tests."""
    return [*TINY, "model=cnn-small", "model_kwargs={width: 4}", "augment=cutout", "cutout_size=4", f"epochs={epochs}"]


SCENARIOS = [
    ["cutout", "run", _train_overrides(3)],
    ["per_replica", "run", [*TINY, "perturbation=per_replica"]],
    ["per_replica_m16", "run", [*TINY, "perturbation=per_replica", "m_sharpness=16"]],
    ["global", "run", [*TINY, "perturbation=global"]],
    ["fsdp_sgd", "run", [*TINY, "method=sgd", "distributed=fsdp"]],
    ["fsdp_whole", "run", [*TINY, "method=sgd", "distributed=fsdp", "epochs=3"]],
    ["fsdp_stop_resume", "stop_resume", [*TINY, "method=sgd", "distributed=fsdp", "epochs=3"]],
    *[
        [
            f"fsdp_{m}{kind}",
            kind.strip("_") or "run",
            [*TINY, f"method={m}", "distributed=fsdp", "perturbation=global", "epochs=3"],
        ]
        for m in ("sam", "fsam")
        for kind in ("", "_stop_resume")
    ],
    ["fsam_whole", "run", [*TINY, "method=fsam"]],
    ["fsam_stop_resume", "stop_resume", [*TINY, "method=fsam"]],
    ["inf_fp16", "poison", [*TINY, "precision=fp16"]],
    ["inf_fp32", "poison", [*TINY, "epochs=1"]],
    *[[f"variant_{m}", "run", [*TINY, f"method={m}", "epochs=1"]] for m in ("looksam", "interval", "aesam", "msam")],
    *[[f"variant_{m}", "run", [*TINY, f"method={m}", "epochs=1"]] for m in ("gsam", "esam", "fsam")],
    ["variant_esam_global", "run", [*TINY, "method=esam", "perturbation=global", "epochs=1"]],
    [
        "compare",
        "cli",
        ["compare", "demo-digits", "--seeds", "0", "--no-progress", *[x for s in TINY for x in ("--set", s)]],
    ],
]


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory, worker_id) -> tuple[Path, list[dict]]:
    """Every scenario on 2 ranks, in one torchrun job that the session's xdist workers share; the job's folder
    and each rank's results."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # the session's folder above each worker's
        shared = shared.parent
    out = shared / "two_ranks"
    with FileLock(shared / "two_ranks.lock"):
        if not (out / "results" / "rank1.pt").is_file():
            out.mkdir(exist_ok=True)
            script = out / "scenarios.py"
            script.write_text(_SCENARIOS)
            done = _run(_torchrun(2, str(script), str(out), json.dumps(SCENARIOS)), out / "cwd")
            (out / "stdout.txt").write_text(done.stdout)
    return out, [torch.load(out / "results" / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_per_replica_on_two_ranks_is_m_sharpness_with_m_the_per_rank_batch(two_ranks, tmp_path):
    out, ranks = two_ranks
    for name, m in (("per_replica", 32), ("per_replica_m16", 16)):  # m_sharpness splits each rank's 32 examples
        reference = _reference(tmp_path, name, [*TINY, f"m_sharpness={m}"])
        assert ranks[0][name].keys() == ranks[1][name].keys()
        for k, v in ranks[0][name].items():
            assert torch.equal(v, ranks[1][name][k]), k  # the ranks apply the same all-reduced gradient
        _assert_close(_weights(out / "runs" / name), _weights(reference))
        for got, want in zip(_metric_lines(out / "runs" / name), _metric_lines(reference), strict=True):
            assert got.keys() == want.keys()
            # passes are each rank's: one process runs both ranks' subsets
            assert (got.pop("passes_per_step"), want.pop("passes_per_step")) == (2 * 32 // m, 2 * 64 // m)
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-5), k
    plain = _reference(tmp_path, "plain", TINY)  # and not plain SAM's step
    assert any(not torch.allclose(v, _weights(plain)[k]) for k, v in _weights(out / "runs" / "per_replica").items())


def test_global_perturbation_on_two_ranks_is_plain_sam_on_the_whole_batch(two_ranks, tmp_path):
    out, ranks = two_ranks
    _assert_close(_weights(out / "runs" / "global"), _weights(_reference(tmp_path, "plain", TINY)))
    assert all(torch.equal(v, ranks[1]["global"][k]) for k, v in ranks[0]["global"].items())


def test_rank_0_alone_writes_the_run_directory(two_ranks):
    out, _ = two_ranks
    run = out / "runs" / "per_replica"
    files = {"config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json", "model.pt", "curves.png"}
    assert {p.name for p in run.iterdir()} == files
    assert [line["epoch"] for line in _metric_lines(run)] == [1, 2]  # one line per epoch, not one per rank
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "backend": "gloo", "mode": "ddp", "perturbation": "per_replica"}
    assert not any((out / "cwd").iterdir())  # nothing written anywhere else
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2


def test_compare_under_torchrun_trains_every_run_together_and_rank_0_reports(two_ranks):
    out, ranks = two_ranks
    assert ranks[0]["compare"] == ranks[1]["compare"] == 0
    compare = out / "runs" / "compare"
    assert {p.name for p in compare.iterdir()} == {"sam-seed0", "sgd-seed0", "report.md", "report.png"}
    for run in ("sam-seed0", "sgd-seed0"):
        assert json.loads((compare / run / "summary.json").read_text())["distributed"]["world_size"] == 2
    assert (out / "stdout.txt").read_text().count("| Experiment |") == 1  # the table, printed by rank 0 alone


def test_variants_keep_the_ranks_in_step(two_ranks):
    """A step that does not ascend (LookSAM, IntervalSAM) all-reduces its only pass, AESAM averages itself, MSAM's
    one pass is all-reduced, GSAM and LookSAM average the clean gradient they mix in: the ranks stay identical."""
    _, ranks = two_ranks
    names = [name for name, _, _ in SCENARIOS if name.startswith("variant_")]
    for name in names:
        assert all(torch.equal(v, ranks[1][name][k]) for k, v in ranks[0][name].items()), name


def test_per_rank_optimizer_state_resumes_exactly(two_ranks):
    """FriendlySAM's moving average is of each rank's own clean gradient under per_replica: each rank's is saved."""
    out, ranks = two_ranks
    for r in range(2):
        split = ranks[r]["fsam_stop_resume"]
        assert split["stopped"].startswith("SIGTERM: checkpoint saved in epoch 2 after step 1;")
        assert all(torch.equal(v, ranks[r]["fsam_whole"][k]) for k, v in split["weights"].items())
    assert _metric_lines(out / "runs" / "fsam_whole") == _metric_lines(out / "runs" / "fsam_stop_resume")


def test_inf_on_one_rank_skips_the_step_on_both(two_ranks):
    out, ranks = two_ranks
    fp16 = [r["inf_fp16"] for r in ranks]
    for r in fp16:
        assert r["skipped"][2] and sum(r["skipped"]) == 1, r["skipped"]  # step 3 alone, on both ranks
    assert all(torch.equal(v, fp16[1]["weights"][k]) for k, v in fp16[0]["weights"].items())
    lines = _metric_lines(out / "runs" / "inf_fp16")
    assert [line["skipped_steps"] for line in lines] == [1, 0]  # counted once, not once per rank
    # Without a GradScaler one skipped step stops the run at the end of its epoch, on every rank alike.
    messages = {r["inf_fp32"]["diverged"] for r in ranks}
    assert messages == {
        "epoch 1: 1 of 4 steps had a non-finite loss or gradient and SAM skipped them (precision fp32, no "
        "GradScaler); lower lr (now 0.05) or rho (now 0.4), or set grad_clip"
    }


def test_fsdp_with_the_base_optimizer_equals_one_process_and_resumes_exactly(two_ranks, tmp_path):
    out, ranks = two_ranks
    reference = _reference(tmp_path, "sgd", [*TINY, "method=sgd"])
    _assert_close(_weights(out / "runs" / "fsdp_sgd"), _weights(reference))  # a full state dict, gathered
    _assert_close(ranks[0]["fsdp_sgd"], _weights(reference))
    for r in range(2):  # stopped by a signal on rank 1 alone, both ranks saved, then resumed: bit for bit
        split = ranks[r]["fsdp_stop_resume"]
        assert split["stopped"].startswith("SIGTERM: checkpoint saved in epoch 2 after step 1;")
        assert all(torch.equal(v, ranks[r]["fsdp_whole"][k]) for k, v in split["weights"].items())
    whole, resumed = out / "runs" / "fsdp_whole", out / "runs" / "fsdp_stop_resume"
    assert _metric_lines(whole) == _metric_lines(resumed)


def test_sam_on_fsdp_equals_one_process_and_resumes_exactly(two_ranks, tmp_path):
    """SAM and FriendlySAM (whose moving average is sharded state) on FSDP2 shards: one process's run of the same
    global perturbation, and a stop-and-resume that ends bit for bit where the uninterrupted run does."""
    out, ranks = two_ranks
    for method in ("sam", "fsam"):
        reference = _reference(tmp_path, method, [*TINY, f"method={method}", "epochs=3"])
        _assert_close(_weights(out / "runs" / f"fsdp_{method}"), _weights(reference))
        for r in range(2):
            split = ranks[r][f"fsdp_{method}_stop_resume"]
            assert split["stopped"].startswith("SIGTERM: checkpoint saved in epoch 2 after step 1;")
            assert all(torch.equal(v, ranks[r][f"fsdp_{method}"][k]) for k, v in split["weights"].items())
        assert _metric_lines(out / "runs" / f"fsdp_{method}") == _metric_lines(
            out / "runs" / f"fsdp_{method}_stop_resume"
        )


def test_rank_0_keeps_the_single_process_streams_and_every_other_rank_gets_its_own():
    assert epoch_seed(7, 3, "augment", rank=0) == epoch_seed(7, 3, "augment")
    seeds = [epoch_seed(s, e, k, r) for s in range(4) for e in range(4) for k in STREAMS for r in range(3)]
    assert len(set(seeds)) == len(seeds)


def test_the_ranks_cut_each_global_batch_into_contiguous_shares():
    images = torch.arange(10 * 2 * 2, dtype=torch.uint8).reshape(10, 2, 2, 1).numpy()
    labels = torch.arange(10).numpy()
    cpu = torch.device("cpu")
    whole = [y for _, y in DeviceData(images, labels, cpu).shuffled(4, seed=3, epoch=1)]
    shares = [[y for _, y in DeviceData(images, labels, cpu, (r, 2)).shuffled(4, seed=3, epoch=1)] for r in (0, 1)]
    assert len(whole) == 2  # the last partial batch dropped, as on one process
    for batch, first, second in zip(whole, *shares, strict=True):
        assert torch.equal(batch, torch.cat([first, second]))
    (resumed,) = [y for _, y in DeviceData(images, labels, cpu, (1, 2)).shuffled(4, seed=3, epoch=1, start=1)]
    assert torch.equal(resumed, shares[1][1])  # a resumed epoch starts at the same global batch


def test_per_rank_config_checks_are_one_line():
    world = World(torch.device("cpu"), rank=0, size=3)
    with pytest.raises(ConfigError, match=r"^batch_size \(64\) is the global batch and must divide by the 3 ranks$"):
        check_config(load_config("demo-digits", TINY), world)
    two = World(torch.device("cpu"), rank=0, size=2)
    with pytest.raises(ConfigError, match=r"^m_sharpness \(32\) must divide each rank's batch \(96 / 2 = 48\)$"):
        check_config(load_config("demo-digits", [*TINY, "batch_size=96", "m_sharpness=32"]), two)
    check_config(load_config("demo-digits", [*TINY, "batch_size=96", "m_sharpness=32"]), world)
    with pytest.raises(ConfigError, match="^second_order does not run data-parallel"):
        check_config(load_config("demo-digits", [*TINY, "second_order=true"]), two)


def test_config_keys_of_the_distributed_modes_are_checked_in_one_line():
    with pytest.raises(ConfigError, match=r"^distributed: fsdp needs perturbation: global \(each rank holds"):
        load_config("demo-digits", ["distributed=fsdp"])
    load_config("demo-digits", ["distributed=fsdp", "perturbation=global"])
    with pytest.raises(ConfigError, match="^m_sharpness needs perturbation: per_replica"):
        load_config("demo-digits", ["perturbation=global", "m_sharpness=16"])
    with pytest.raises(ConfigError, match="^perturbation must be one of per_replica, global; got 'local'"):
        load_config("demo-digits", ["perturbation=local"])
    load_config("demo-digits", ["distributed=fsdp", "method=sgd"])


def _train_args(out: Path, *extra: str, epochs: int = 3) -> list[str]:
    sets = [x for s in _train_overrides(epochs) for x in ("--set", s)]
    return ["train", "demo-digits", "--out", str(out), "--no-progress", *sets, *extra]


def test_one_rank_under_torchrun_is_a_plain_run_bit_for_bit(tmp_path):
    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched run's OMP_NUM_THREADS=1: the float rounding depends on it
    try:
        assert main(_train_args(single)) == 0
    finally:
        torch.set_num_threads(threads)
    launched = tmp_path / "launched"
    _run(_torchrun(1, "-m", "sharpness", *_train_args(launched)), tmp_path / "cwd")
    assert _metric_lines(single) == _metric_lines(launched)
    a, b = _weights(single), _weights(launched)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _start_paused(tmp_path: Path, out: Path, pause_at: int, *extra: str) -> tuple[subprocess.Popen, list[int]]:
    """A 2-rank ``sharpness train`` job held before global step ``pause_at``; torchrun and the ranks' pids."""
    script, marker = tmp_path / "pause.py", tmp_path / f"paused-{pause_at}"
    script.write_text(_PAUSE_AT_STEP)
    (tmp_path / "cwd").mkdir(exist_ok=True)
    cmd = _torchrun(2, str(script), str(pause_at), str(marker), *_train_args(out, *extra))
    proc = subprocess.Popen(cmd, cwd=tmp_path / "cwd", env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    markers = [Path(f"{marker}-{r}") for r in range(2)]
    deadline = time.time() + TIMEOUT
    while not all(m.is_file() and m.read_text() for m in markers):
        if proc.poll() is not None:
            pytest.fail(f"training ended before it reached step {pause_at}: {proc.communicate()[1].decode()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for both ranks to reach step {pause_at}")
        time.sleep(0.05)
    return proc, [int(m.read_text()) for m in markers]


def test_kill_9_and_sigterm_of_two_ranks_then_resume_give_the_uninterrupted_run(tmp_path, two_ranks):
    """Per-rank augmentation streams (Cutout), BatchNorm, and generators saved mid-epoch for each rank; the
    uninterrupted run is the scenarios' ``cutout``."""
    whole = two_ranks[0] / "runs" / "cutout"
    out = tmp_path / "run"
    proc, pids = _start_paused(tmp_path, out, 4 + 2)  # both ranks held before the 2nd step of epoch 2
    for pid in [proc.pid, *pids]:  # the whole job, at once
        os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 0) and not (out / "summary.json").exists()

    proc, _ = _start_paused(tmp_path, out, 4 + 3, "--resume")  # the 3rd step of epoch 3, counted from the resume
    proc.send_signal(signal.SIGTERM)  # as a scheduler stops a job: torchrun passes it on to every rank
    stderr = proc.communicate(timeout=TIMEOUT)[1].decode()
    assert "SIGTERM: checkpoint saved in epoch 3 after step 3" in stderr, stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (2, 3) and len(state["ranks"]) == 2

    assert main(_train_args(out, "--resume")) == 2  # on one process: refused, in one line
    _run(_torchrun(2, "-m", "sharpness", *_train_args(out, "--resume")), tmp_path / "cwd")
    assert _metric_lines(whole) == _metric_lines(out)
    a, b = _weights(whole), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_on_another_number_of_ranks_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config("demo-digits", TINY)

    class StopsMidEpoch(Trainer):
        def _step(self, *args):
            super()._step(*args)
            self._stop = True

    with pytest.raises(Exception, match="SIGTERM"):
        StopsMidEpoch(cfg, run, progress=False).run()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["world_size"] = 2  # as a 2-rank job saves it
    state["ranks"] = [{}, {}]
    torch.save(state, run / "checkpoint.pt")
    assert main(["train", "demo-digits", "--out", str(run), "--resume", *[x for s in TINY for x in ("--set", s)]]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sharpness train: error: --resume: {run} was checkpointed by 2 rank(s) and this is 1; resume it on 2 "
        "(torchrun --nproc_per_node ...): each rank's share of the batch, its random streams and per_replica's m "
        "depend on the number of ranks"
    )
