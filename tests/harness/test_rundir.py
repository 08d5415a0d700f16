"""The run directory: torn metric lines, missing curves, stale temporary files, one-line OS errors."""

from __future__ import annotations

import errno
import os
import socket
import urllib.error
from pathlib import Path

import pytest
import torch
from tests.harness.test_train import FAST, STEPS, _assert_same_run, _StopsAtStep

from sharpness.cli.main import main
from sharpness.harness import checkpoint as checkpoint_module
from sharpness.harness.checkpoint import append_jsonl, is_temporary
from sharpness.harness.config import load_config
from sharpness.harness.data import download as download_module
from sharpness.harness.rundir import RunDir
from sharpness.harness.train import Trainer, train

ONE = [*FAST, "epochs=1"]
ONE_SETS = ["--no-progress", *[x for s in ONE for x in ("--set", s)]]


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())} if run.is_dir() else {}


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def killed_after_epoch_1(tmp_path_factory) -> tuple[Path, Path]:
    """A whole two-epoch run and one crashed at the first step of epoch 2 (epoch 1's checkpoint the latest)."""
    root = tmp_path_factory.mktemp("two")
    cfg = load_config("demo-digits", [*FAST, "epochs=2"])
    Trainer(cfg, root / "whole", progress=False).run()
    crash = _StopsAtStep(cfg, root / "crashed", progress=False)
    crash.at = STEPS + 1
    with pytest.raises(KeyboardInterrupt):
        crash.run()
    return root / "whole", root / "crashed"


def _copy(run: Path, to: Path) -> Path:
    to.mkdir()
    for name, data in _files(run).items():
        (to / name).write_bytes(data)
    return to


def test_resume_drops_a_torn_last_metrics_line(tmp_path, killed_after_epoch_1):
    whole, crashed = killed_after_epoch_1
    run = _copy(crashed, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_loss": 0.1')  # power cut between the write and its fsync
    train(load_config("demo-digits", [*FAST, "epochs=2"]), run, resume=True, progress=False)
    _assert_same_run(whole, run)


def test_a_corrupt_metrics_line_before_the_last_names_the_file_and_line(tmp_path, killed_after_epoch_1, capsys):
    _, crashed = killed_after_epoch_1
    run = _copy(crashed, tmp_path / "run")
    good = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text('{"epoch": 0, "tr\n' + good)
    sets = [x for s in [*FAST, "epochs=2"] for x in ("--set", s)]
    assert main(["train", "demo-digits", "--out", str(run), "--resume", "--no-progress", *sets]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"sharpness train: error: {run / 'metrics.jsonl'}, line 1: not a JSON record")
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 0, "tr\n' + good, "the damaged file is left as it was"


def test_resume_and_compare_draw_the_curves_a_finished_run_lacks(tmp_path, capsys):
    out = tmp_path / "cmp"
    compare = ["compare", "demo-digits", "--seeds", "0", "--methods", "sgd", "--out", str(out), *ONE_SETS]
    assert main(compare) == 0
    run = out / "sgd-seed0"
    model = (run / "model.pt").stat().st_mtime_ns
    (run / "curves.png").unlink()  # killed after summary.json, before the plot
    assert main(compare) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (run / "curves.png").unlink()
    assert main(["train", "demo-digits", "--out", str(run), "--resume", "--set", "method=sgd", *ONE_SETS]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "model.pt").stat().st_mtime_ns == model, "a finished run is not trained again"


@pytest.mark.parametrize("resume", [False, True])
def test_stale_temporary_files_are_no_run_and_are_cleaned(tmp_path, resume):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".checkpoint.pt.k3j2x9.tmp", run / ".config.yaml.a81b.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    assert all(is_temporary(p.name) for p in stale) and not RunDir(run).holds_files()
    assert main(["train", "demo-digits", "--out", str(run), *ONE_SETS, *(["--resume"] if resume else [])]) == 0
    assert (run / "summary.json").is_file()
    assert not [p.name for p in run.iterdir() if is_temporary(p.name) or p.name == ".lock"]


def test_resume_of_a_directory_that_does_not_exist_is_refused_and_leaves_nothing(tmp_path, capsys):
    run = tmp_path / "typo"
    assert main(["train", "demo-digits", "--out", str(run), "--resume", *ONE_SETS]) == 2
    assert "holds no run" in _one_line(capsys.readouterr().err)
    assert not run.exists()


def test_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    run = tmp_path / "file" / "run"
    assert main(["train", "demo-digits", "--out", str(run), *ONE_SETS]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("sharpness train: error: could not create the run directory")
    assert "Not a directory" in line and "choose another --out" in line
    assert (tmp_path / "file").read_text() == "mine"


def test_permission_denied_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    run = parent / "run"
    if os.geteuid() == 0:  # root writes anywhere: refuse the way a read-only folder does
        mkdir = Path.mkdir

        def refused(self, *args, **kwargs):
            if self == run:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refused)
    else:
        parent.chmod(0o500)
    try:
        assert main(["train", "demo-digits", "--out", str(run), *ONE_SETS]) == 2
    finally:
        parent.chmod(0o700)
    line = _one_line(capsys.readouterr().err)
    assert f"could not create the run directory {run}: Permission denied" in line
    assert "choose a directory you may write (--out)" in line
    assert list(parent.iterdir()) == []


def test_no_space_left_is_one_line_leaves_no_temporary_file_and_resumes(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", "demo-digits", "--out", str(run), *ONE_SETS]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == (
        f"sharpness train: error: could not write {run / 'checkpoint.pt'}: No space left on device; free some "
        "space there, then run the command again (train: with --resume)"
    )
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl"], "no checkpoint, no temp file"
    monkeypatch.setattr(torch, "save", save)
    assert main(["train", "demo-digits", "--out", str(run), "--resume", *ONE_SETS]) == 0
    assert (run / "summary.json").is_file()


def test_a_failed_append_leaves_no_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"epoch": 1})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        append_jsonl(path, {"epoch": 2})
    assert path.read_text() == '{"epoch": 1}\n'


def test_download_without_network_is_one_line(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    monkeypatch.setattr(download_module.urllib.request, "urlopen", offline)
    assert main(["download", "mnist", "--data-dir", str(tmp_path)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("sharpness download: error: could not download ") and "Name or service not known" in line
    assert "check the network connection" in line
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "no partial download is left"


@pytest.mark.parametrize("content", ["truncated", "foreign"])
def test_a_corrupt_checkpoint_names_the_file_without_pytorchs_advice(tmp_path, capsys, content):
    run = tmp_path / "run"
    cfg = load_config("demo-digits", ONE)
    with RunDir(run).lock() as files:
        files.open(cfg)
    if content == "truncated":
        (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 torn")
    else:
        torch.save({"model": socket.AddressFamily.AF_INET}, run / "checkpoint.pt")  # a global weights_only refuses
    assert main(["train", "demo-digits", "--out", str(run), "--resume", *ONE_SETS]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"sharpness train: error: {run / 'checkpoint.pt'}: not a readable checkpoint (")
    assert "weights_only" not in line and "start the run again in another --out" in line
