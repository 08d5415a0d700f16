"""The training loop: exact resume after kill -9 and SIGTERM, run-dir safety, failed starts, device changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sharpness.cli.main import main
from sharpness.harness import rundir as rundir_module
from sharpness.harness.config import load_config
from sharpness.harness.train import Interrupted, RunDirExists, Trainer, train

# Crop, flip and Cutout draw from the augmentation generator, so resuming must restore it exactly.
FAST = ["epochs=4", "batch_size=64", "model_kwargs={width: 8}", "augment=cutout", "cutout_size=4"]
STEPS = 1297 // 64  # training batches per epoch of the embedded digits

# Runs `sharpness <args>` with Trainer._step held before global step N (1-based) until SIGTERM arrives (or for
# two minutes, time enough for a SIGKILL), after writing MARKER: a kill that lands at a known step.
_PAUSE_AT_STEP = """
import sys, time
from pathlib import Path
from sharpness.cli.main import main
from sharpness.harness.train import Trainer

pause_at, marker = int(sys.argv[1]), Path(sys.argv[2])
original, count = Trainer._step, [0]

def step(self, *args):
    count[0] += 1
    if count[0] == pause_at:
        marker.write_text("paused")
        deadline = time.time() + 120
        while not self._stop and time.time() < deadline:
            time.sleep(0.01)
    return original(self, *args)

Trainer._step = step
sys.exit(main(sys.argv[3:]))
"""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sharpness.cli.main", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _metric_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("seconds", "cpu_seconds")} for line in lines]


def _assert_same_run(a: Path, b: Path) -> None:
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert _metric_lines(a) == _metric_lines(b)


def _train_cli(out: Path, *extra: str, method: str = "sam") -> subprocess.CompletedProcess:
    sets = [x for s in [*FAST, f"method={method}"] for x in ("--set", s)]
    return subprocess.run(
        _cli("train", "demo-digits", "--out", str(out), *sets, *extra),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    done = _train_cli(out)
    assert done.returncode == 0, done.stderr
    return out


def _start_paused(out: Path, pause_at: int, marker: Path) -> subprocess.Popen:
    sets = [x for s in [*FAST, "method=sam"] for x in ("--set", s)]
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            _PAUSE_AT_STEP,
            str(pause_at),
            str(marker),
            "train",
            "demo-digits",
            "--out",
            str(out),
            *sets,
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if marker.exists():
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before it reached the step to pause at: {proc.stderr.read()}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {marker}")


def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_result(tmp_path, reference_run):
    out, marker = tmp_path / "run", tmp_path / "paused"
    proc = _start_paused(out, 2 * STEPS + 7, marker)  # held before the 7th step of epoch 3
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (2, 0), "the kill landed inside epoch 3, after epoch 2's end"
    assert [line["epoch"] for line in _metric_lines(out)] == [1, 2] and not (out / "summary.json").exists()
    resumed = _train_cli(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference_run, out)


def test_sigterm_saves_mid_epoch_and_resume_gives_the_uninterrupted_result(tmp_path, reference_run):
    out, marker = tmp_path / "run", tmp_path / "paused"
    proc = _start_paused(out, STEPS + 10, marker)  # held before the 10th step of epoch 2
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "checkpoint saved in epoch 2 after step 10" in stderr and "Traceback" not in stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 10)
    resumed = _train_cli(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference_run, out)


def test_run_directory_is_never_silently_overwritten(tmp_path, reference_run):
    done = _train_cli(reference_run)
    assert done.returncode == 2
    assert "not empty" in done.stderr and "--resume" in done.stderr
    with pytest.raises(RunDirExists):
        train(load_config("demo-digits", FAST), reference_run)


def test_resume_refuses_a_changed_config(tmp_path, reference_run):
    done = _train_cli(reference_run, "--resume", "--set", "rho=0.2")
    assert done.returncode == 2 and "rho" in done.stderr


def test_sgd_run_and_summary_contents(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "method=sgd", "label_noise=0.4"])
    (summary,) = train(cfg, tmp_path / "run", progress=False)
    assert summary["method"] == "sgd" and summary["experiment"] == "demo-digits"
    for key in ("test_error", "test_loss", "train_error", "noisy_labels_fitted"):
        assert 0 <= summary["metrics"][key] < 100 or key == "test_loss"
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json", "model.pt", "curves.png"):
        assert (tmp_path / "run" / name).is_file(), name
    assert [line["epoch"] for line in _metric_lines(tmp_path / "run")] == [1, 2, 3, 4]


def test_bootstrap_retrains_on_predicted_labels(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "label_noise=0.4", "bootstrap=true"])
    first, second = train(cfg, tmp_path / "run", progress=False)
    assert first["method"] == "sam" and second["method"] == "sam+bootstrap"
    assert (tmp_path / "run" / "bootstrap" / "summary.json").is_file()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_train_and_resume_exactly(tmp_path, precision):
    """bf16 autocast, and fp16 autocast with GradScaler (SAM's step driven by scaler.step)."""
    cfg = load_config("demo-digits", [*FAST, f"precision={precision}", "epochs=2"])
    whole = Trainer(cfg, tmp_path / "whole", progress=False).run()
    assert whole["metrics"]["test_error"] < 90 and whole["metrics"]["skipped_steps"] < 5
    cfg1 = load_config("demo-digits", [*FAST, f"precision={precision}", "epochs=2"])

    class StopsAfterOneEpoch(Trainer):  # as if SIGTERM arrived at the end of epoch 1
        def _end_epoch(self, *args, **kwargs):
            self._stop = True
            return super()._end_epoch(*args, **kwargs)

    with pytest.raises(Interrupted):
        StopsAfterOneEpoch(cfg1, tmp_path / "split", progress=False).run()
    Trainer(cfg1, tmp_path / "split", progress=False).run(resume=True)
    _assert_same_run(tmp_path / "whole", tmp_path / "split")


def test_second_order_trains_through_the_closure_form(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "epochs=1", "second_order=true"])
    (summary,) = train(cfg, tmp_path / "run", progress=False)
    assert summary["metrics"]["test_error"] < 95


def test_a_run_killed_before_its_first_checkpoint_resumes_from_scratch(tmp_path, reference_run):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text((reference_run / "config.yaml").read_text())
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')  # a line whose checkpoint never landed
    resumed = _train_cli(out, "--resume", "--device", "cpu")  # the device may change on resume
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference_run, out)


def test_resuming_a_finished_bootstrap_run_trains_nothing(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "epochs=1", "label_noise=0.4", "bootstrap=true"])
    first, second = train(cfg, tmp_path / "run", progress=False)
    stamp = (tmp_path / "run" / "bootstrap" / "model.pt").stat().st_mtime_ns
    again = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert again[0] == first and again[1]["metrics"] == second["metrics"]
    assert (tmp_path / "run" / "bootstrap" / "model.pt").stat().st_mtime_ns == stamp


def test_a_failed_start_leaves_nothing_and_the_fixed_command_runs_in_the_same_directory(tmp_path, capsys):
    out = tmp_path / "run"
    too_big = ["train", "demo-digits", "--out", str(out), "--no-progress", "--set", "batch_size=5000"]
    assert main(too_big) == 2
    assert "batch_size 5000 exceeds the 1297 training examples" in capsys.readouterr().err
    missing = ["train", "demo-digits", "--out", str(out), "--set", "dataset=cifar10", "--data-dir", str(tmp_path)]
    assert main(missing) == 2
    assert "data set 'cifar10' not found" in capsys.readouterr().err
    bad_model = ["train", "demo-digits", "--out", str(out), "--set", "model_kwargs={depth: 3}"]
    assert main(bad_model) == 2
    assert capsys.readouterr().err.strip() == (
        "sharpness train: error: model_kwargs: model 'cnn-small' has no option 'depth'; it accepts width (int, "
        "default 32)"
    )
    assert not out.exists()
    fixed = ["train", "demo-digits", "--out", str(out), "--no-progress", "--set", "epochs=1", "--set", "batch_size=64"]
    assert main(fixed) == 0
    assert (out / "summary.json").is_file()


def test_config_and_model_are_written_atomically(tmp_path, monkeypatch):
    written = []
    atomic = rundir_module.atomic_write_bytes

    def recording(path, write):
        written.append(Path(path).name)
        return atomic(path, write)

    monkeypatch.setattr(rundir_module, "atomic_write_bytes", recording)
    train(load_config("demo-digits", [*FAST, "epochs=1", "label_noise=0.4", "bootstrap=true"]), tmp_path / "run")
    assert written == ["config.yaml", "model.pt", "train_labels.npy", "config.yaml", "model.pt"]


class _StopsAtStep(Trainer):
    """Ends the run by an exception before global step ``at`` (1-based), as a crash would."""

    at = 0

    def _step(self, *args):
        self._steps = getattr(self, "_steps", 0) + 1
        if self._steps == self.at:
            raise KeyboardInterrupt
        return super()._step(*args)


def _as_if_saved_on_cuda(checkpoint: Path) -> None:
    state = torch.load(checkpoint, weights_only=True)
    state["device_type"] = "cuda"
    state["rng_aug"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state: seed and offset
    state["rng_cuda"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, checkpoint)


def test_resume_on_another_device_from_an_epoch_boundary_is_exact(tmp_path):
    cfg = load_config("demo-digits", [*FAST, "epochs=2", "device=cpu"])
    whole = tmp_path / "whole"
    Trainer(cfg, whole, progress=False).run()
    split = tmp_path / "split"
    crash = _StopsAtStep(cfg, split, progress=False)
    crash.at = STEPS + 1  # the first step of epoch 2: epoch 1's checkpoint is the latest
    with pytest.raises(KeyboardInterrupt):
        crash.run()
    _as_if_saved_on_cuda(split / "checkpoint.pt")
    Trainer(cfg, split, progress=False).run(resume=True)
    _assert_same_run(whole, split)


def test_resume_on_another_device_mid_epoch_is_refused_in_one_line(tmp_path, capsys):
    cfg = load_config("demo-digits", [*FAST, "epochs=2", "device=cpu"])

    class StopsMidEpoch(Trainer):
        def _step(self, *args):
            super()._step(*args)
            self._stop = True

    with pytest.raises(Interrupted):
        StopsMidEpoch(cfg, tmp_path / "run", progress=False).run()
    _as_if_saved_on_cuda(tmp_path / "run" / "checkpoint.pt")
    sets = [x for s in [*FAST, "epochs=2"] for x in ("--set", s)]
    assert main(["train", "demo-digits", "--out", str(tmp_path / "run"), "--resume", "--device", "cpu", *sets]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sharpness train: error: --resume: {tmp_path / 'run'} was checkpointed on cuda in the middle of epoch 1 "
        "(after step 1); resume it on cuda (the device may change only at an epoch boundary, where every "
        "generator is re-seeded)"
    )


def test_sigint_saves_mid_epoch_like_sigterm_and_names_resume(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "paused"
    proc = _start_paused(out, STEPS + 10, marker)  # held before the 10th step of epoch 2
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr  # 128 + SIGINT, as 143 is 128 + SIGTERM
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "sharpness: SIGINT: checkpoint saved in epoch 2 after step 10; continue with the same command "
        "(train: add --resume)"
    ]
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # the checkpoint SIGTERM's test resumes exactly
    assert (state["epoch"], state["step_in_epoch"]) == (1, 10)


# Holds a run directory's lock as a training process would, until killed.
_HOLD_LOCK = """
import sys, time
from sharpness.harness.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(120)
"""


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_second_train_on_a_busy_run_stops_in_one_line_and_writes_nothing(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "paused"
    first = _start_paused(out, 5, marker)  # the owner, held inside epoch 1
    _wait_for(marker, first)
    before = _snapshot(out)
    for extra in (["--set", "rho=0.05"],):
        second = _train_cli(out, *extra)
        assert second.returncode == 2, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"sharpness train: error: {out} is in use by pid {first.pid} ")
        assert "train demo-digits --out" in lines[0], "the lock file names the owner's command"
        assert "choose another --out" in lines[0]
        assert _snapshot(out) == before, "the refused command wrote into the run"
    first.send_signal(signal.SIGKILL)  # the OS drops a killed owner's lock
    first.communicate(timeout=60)
    resumed = _train_cli(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "summary.json").is_file() and not (out / ".lock").exists()


def test_compare_and_select_rho_refuse_a_busy_run_until_its_owner_is_killed(tmp_path, capsys):
    cmp_out, rho_out = tmp_path / "cmp", tmp_path / "rho"
    holders = []
    for run in (cmp_out / "sgd-seed0", rho_out / "rho0.05"):
        holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run)], env=_env(), stdout=subprocess.PIPE)
        assert holder.stdout.readline() == b"locked\n"
        holders.append(holder)
    sets = ["--no-progress", *[x for s in [*FAST, "epochs=1"] for x in ("--set", s)]]
    compare = ["compare", "demo-digits", "--seeds", "0", "--methods", "sgd", "--out", str(cmp_out), *sets]
    select = ["select-rho", "demo-digits", "--grid", "0.05", "--out", str(rho_out), *sets]
    for argv, holder, run in ((compare, holders[0], "sgd-seed0"), (select, holders[1], "rho0.05")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        busy = Path(argv[argv.index("--out") + 1]) / run
        assert "\n" not in err and err.startswith(f"sharpness {argv[0]}: error: {busy} is in use by pid {holder.pid} ")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "cmp",
        "cmp/sgd-seed0",
        "cmp/sgd-seed0/.lock",
        "rho",
        "rho/rho0.05",
        "rho/rho0.05/.lock",
    ], "the refused commands wrote nothing"
    assert not (cmp_out / "report.md").exists() and not (rho_out / "selection.json").exists()
    for holder in holders:
        holder.kill()
        holder.wait(timeout=60)
    assert main(compare) == 0 and (cmp_out / "report.md").is_file()
    assert main(select) == 0 and (rho_out / "selection.json").is_file()


def _epochs_logged(run: Path) -> int:
    try:
        return (run / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_kill_9_at_random_instants_then_resume_gives_the_uninterrupted_result(tmp_path, reference_run):
    """Fault injection: SIGKILL at seeded random instants (in setup, mid-epoch, between an epoch's metrics line
    and its checkpoint, in the finish), each a random delay after a random epoch's line landed, then resume;
    the result is bit-identical to an uninterrupted run."""
    import random

    rng, out, landed = random.Random(8), tmp_path / "run", []
    sets = [x for s in [*FAST, "method=sam"] for x in ("--set", s)]
    # Kill i lands once int(p_i) epochs' lines are written, (p_i % 1) * 0.4 s later: ordered, so the run advances.
    for position in sorted(rng.uniform(0.0, 4.5) for _ in range(3)):
        resume = ["--resume"] if (out / "config.yaml").exists() else []
        after, delay = min(int(position), 4), (position % 1) * 0.4
        proc = subprocess.Popen(
            _cli("train", "demo-digits", "--out", str(out), *sets, *resume),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if (out / ".lock").exists() and _epochs_logged(out) >= after:
                break
            time.sleep(0.002)
        time.sleep(delay)
        proc.kill()
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), stderr.decode()
        state = torch.load(out / "checkpoint.pt", weights_only=True) if (out / "checkpoint.pt").exists() else None
        landed.append(None if state is None else (state["epoch"], state["step_in_epoch"]))
    print("kills landed at (epoch, step) of the latest checkpoint:", landed)
    resumed = _train_cli(out, *(["--resume"] if (out / "config.yaml").exists() else []))
    assert resumed.returncode == 0, (landed, resumed.stderr)
    _assert_same_run(reference_run, out)
