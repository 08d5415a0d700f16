"""Training on image folders through the trainer (issue 11): `sharpness train` end to end, class order, a corrupt
file in one line, deterministic evaluation, top-5 error, finetuning from the harness's own model.pt, a model
brought by import path, and bit-identical resumes (SIGTERM mid-epoch with a loader worker, a crash after an
epoch). The folders are tiny generated JPEGs and PNGs (32x24 pixels, cropped to 16), so each run takes seconds."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tests.harness.test_train import _PAUSE_AT_STEP

from sharpness.cli.main import main
from sharpness.harness.config import ConfigError, load_config
from sharpness.harness.data.imagefolder import EpochSampler, load_imagefolder
from sharpness.harness.models import build_model
from sharpness.harness.train import Trainer, train

BYO_DIR = Path(__file__).parent / "byo"  # holds streaming_net.py, a user's module outside any package
CLASSES = ("zebra", "ant", "mole", "bee", "owl", "yak")  # created out of order: labels follow the sorted names


def _image(seed: int) -> Image.Image:
    """A smooth random 32x24 picture (JPEG-friendly), brighter for higher seeds' classes."""
    small = np.random.default_rng(seed).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((32, 24), Image.Resampling.BILINEAR)


def _folder(root: Path, classes: tuple[str, ...], train: int = 4, val: int = 2) -> Path:
    seed = 0
    for split, per_class in (("train", train), ("val", val)):
        for cls in classes:
            for i in range(per_class):
                path = root / split / cls / f"{cls}_{i}{'.png' if i == 1 else '.jpg'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                _image(seed).save(path)
                seed += 1
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """6 classes of 4 training and 2 validation images: 3 batches of 8 per epoch, 12 test images."""
    return _folder(tmp_path_factory.mktemp("images"), CLASSES)


def _config(path: Path, data_dir: Path, **changes) -> Path:
    values = {
        "dataset": "imagefolder",
        "data_dir": str(data_dir),
        "image_size": 16,
        "eval_resize": 20,
        "loader_workers": 0,
        "model": "cnn-small",
        "model_kwargs": {"width": 4},
        "augment": "none",
        "epochs": 2,
        "batch_size": 8,
        "lr": 0.05,
        "weight_decay": 5e-4,
        "label_smoothing": 0.1,
        "eval_batch_size": 5,
        "device": "cpu",
        **changes,
    }
    path.write_text(yaml.safe_dump(values))
    return path


def _metric_lines(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in ("seconds", "cpu_seconds")} for line in lines]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert _metric_lines(a) == _metric_lines(b)


@pytest.fixture(scope="module")
def pretrained(folder, tmp_path_factory) -> Path:
    """A finished `sharpness train` run on the folder with two loader workers: the run finetuning starts from."""
    tmp = tmp_path_factory.mktemp("pretrained")
    out = tmp / "run"
    assert main(["train", str(_config(tmp / "cfg.yaml", folder, loader_workers=2)), "--out", str(out)]) == 0
    return out


def test_sharpness_train_end_to_end_with_top5_error(pretrained: Path, capsys) -> None:
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["classes"] == sorted(CLASSES) and summary["epochs"] == 2
    metrics = summary["metrics"]
    assert 0 <= metrics["test_top5_error"] <= metrics["test_error"] <= 100
    lines = _metric_lines(pretrained)
    assert [line["epoch"] for line in lines] == [1, 2]
    for line in lines:
        assert line["test_top5_error"] <= line["test_error"] and line["passes_per_step"] == 2.0
    # 12 test images: every error is a whole number of them
    assert all(round(line[k] * 12 / 100, 6).is_integer() for line in lines for k in ("test_error", "test_top5_error"))
    state = torch.load(pretrained / "model.pt", weights_only=True)
    assert state["fc.weight"].shape == (len(CLASSES), 8)
    assert (pretrained / "curves.png").is_file() and (pretrained / "checkpoint.pt").is_file()


def test_report_shows_top5_beside_top1(pretrained: Path, capsys) -> None:
    assert main(["report", str(pretrained)]) == 0
    out = capsys.readouterr().out
    assert "test_top5_error" in out and out.count("| cfg |") == 2


def test_labels_follow_the_sorted_class_folders_and_evaluation_is_deterministic(folder: Path, tmp_path: Path) -> None:
    cfg = load_config(str(_config(tmp_path / "cfg.yaml", folder)))
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer._setup()
    train_list, _ = load_imagefolder(folder)
    assert trainer.data.classes == tuple(sorted(CLASSES)) and trainer.model.fc.out_features == len(CLASSES)
    for i in range(len(train_list)):  # each file's label is its folder's index among the sorted names
        assert train_list.classes[train_list.labels[i]] == train_list.path(i).parent.name
    sampler = EpochSampler(len(train_list), cfg.batch_size, cfg.seed)
    sampler.set_epoch(1)
    expected = train_list.labels[[index for _, index in sampler]]
    seen = torch.cat([labels for _, labels in trainer._batches(1, 0)])
    assert seen.tolist() == expected.tolist() and len(seen) == 3 * 8
    test_set = trainer.eval_sets["test"]
    first, second = list(test_set.in_order(cfg.eval_batch_size)), list(test_set.in_order(cfg.eval_batch_size))
    assert [len(labels) for _, labels in first] == [5, 5, 2]
    for (xa, ya), (xb, yb) in zip(first, second, strict=True):
        assert xa.dtype == torch.uint8 and xa.shape[1:] == (3, 16, 16)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert trainer.evaluate() == trainer.evaluate()
    assert not (tmp_path / "run").exists()  # setting up writes nothing


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_stops_the_run_in_one_line_naming_it(tmp_path: Path, capsys, workers: int) -> None:
    data = _folder(tmp_path / "data", CLASSES[:3])
    bad = data / "train" / "ant" / "ant_0.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated JPEG
    cfg = _config(tmp_path / "cfg.yaml", data, loader_workers=workers, epochs=1)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sharpness train: error: {bad}: cannot read image (") and err.count("\n") == 1


def test_config_rules_of_imagefolder(folder: Path, tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path / "cfg.yaml", folder)
    for change, message in [
        ("augment=basic", "dataset: imagefolder needs augment: none (its crops and flips happen in the loader)"),
        ("label_noise=0.2", "label_noise: not available with dataset: imagefolder"),
        ("eval_resize=8", "eval_resize (8) must be at least image_size (16)"),
        ("loader_workers=-1", "loader_workers must be an integer >= 0"),
        ("decoder=turbo", "decoder must be one of pillow, simplejpeg"),
        ("freeze=[1]", "freeze must be str; got 1"),
        ("train_steps=0", "train_steps must be an integer >= 1 or null"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(str(cfg), [change])
    with pytest.raises(ConfigError, match="image_size, decoder: options of dataset: imagefolder, not of digits"):
        load_config("demo-digits", ["image_size=64", "decoder=simplejpeg"])
    assert load_config(str(cfg), ["freeze=[conv1.*, 'layer1.*']"]).freeze == ["conv1.*", "layer1.*"]
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--set", "data_dir=null"]) == 2
    assert "dataset: imagefolder needs data_dir (--data-dir DIR)" in capsys.readouterr().err
    assert not out.exists()  # a failed start leaves nothing behind


def test_finetuning_from_a_harness_model_changes_only_what_it_should(pretrained: Path, tmp_path: Path, capsys) -> None:
    """Table 3's recipe on a new 4-class set: pretrained backbone, fresh head, a frozen first layer, frozen
    BatchNorm statistics, a lower backbone lr, and a length in steps (4 steps of 3 per epoch: 2 epochs)."""
    data = _folder(tmp_path / "data", ("kiwi", "fig", "lime", "plum"), train=6)
    frozen = ["features.0.*", "features.1.*"]
    cfg_file = _config(
        tmp_path / "cfg.yaml",
        data,
        init_from=str(pretrained / "model.pt"),
        freeze=frozen,
        freeze_bn_stats=True,
        backbone_lr_scale=0.1,
        train_steps=4,
        lr=0.1,
        seed=3,
    )
    cfg = load_config(str(cfg_file))
    fresh = Trainer(cfg, tmp_path / "unused", progress=False)
    fresh._setup()
    torch.manual_seed(cfg.seed)
    expected_head = build_model("cnn-small", 4, 3, image_size=16, width=4).fc
    assert torch.equal(fresh.model.fc.weight, expected_head.weight)  # the seed's fresh init, for 4 classes
    assert torch.equal(fresh.model.fc.bias, expected_head.bias)

    out = tmp_path / "run"
    assert main(["train", str(cfg_file), "--out", str(out)]) == 0
    assert "classifier 'fc' re-initialised for 4 classes (the file has 6 classes)" in capsys.readouterr().err
    before = torch.load(pretrained / "model.pt", weights_only=True)
    after = torch.load(out / "model.pt", weights_only=True)
    assert after["fc.weight"].shape == (4, 8) and not torch.equal(after["fc.weight"], expected_head.weight)
    for key, value in after.items():
        if key.startswith(("features.0.", "features.1.")) or "running_" in key or "num_batches" in key:
            assert torch.equal(value, before[key]), key  # frozen weights and every BatchNorm statistic
        elif not key.startswith("fc."):
            assert not torch.equal(value, before[key]), key  # the rest of the backbone trains
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finetune"]["head"] == "fc" and summary["finetune"]["head_replaced"] is True
    assert summary["finetune"]["frozen"] == ["features.0.weight", "features.1.weight", "features.1.bias"]
    assert summary["finetune"]["bn_stats_frozen"] == 3
    lines = _metric_lines(out)
    assert [line["epoch"] for line in lines] == [1, 2] and summary["epochs"] == 2
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["schedule"]["last_epoch"] == 4  # 3 steps, then 1 of the second epoch
    groups = checkpoint["optimizer"]["base_optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert [g["initial_lr"] for g in groups] == [0.1, pytest.approx(0.01)]
    assert lines[-1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 3 / 4)))  # the cosine's 4th of 4 steps


def test_a_model_brought_by_import_path_trains_through_sharpness_train(
    folder: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.syspath_prepend(str(BYO_DIR))
    cfg = _config(tmp_path / "cfg.yaml", folder, model="streaming_net:make", model_kwargs={"width": 3}, epochs=1)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out)]) == 0
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["0.weight"].shape == (3, 3, 3, 3) and state["4.weight"].shape == (len(CLASSES), 3)
    assert json.loads((out / "summary.json").read_text())["metrics"]["test_top5_error"] >= 0


@pytest.fixture(scope="module")
def dropout_reference(folder: Path, tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted 3-epoch run of the dropout model with one loader worker: (its config, its directory)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = _config(tmp / "cfg.yaml", folder, model="streaming_net:make", model_kwargs={}, epochs=3, loader_workers=1)
    sys.path.insert(0, str(BYO_DIR))
    try:
        train(load_config(str(cfg)), tmp / "run", progress=False)
    finally:
        sys.path.remove(str(BYO_DIR))
    return cfg, tmp / "run"


def test_sigterm_mid_epoch_with_a_loader_worker_then_resume_is_bit_identical(
    dropout_reference, tmp_path: Path, monkeypatch
) -> None:
    cfg, reference = dropout_reference
    out, marker = tmp_path / "run", tmp_path / "paused"
    path = os.pathsep.join(filter(None, [str(BYO_DIR), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    args = ["train", str(cfg), "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSE_AT_STEP, "5", str(marker), *args],  # before step 2 of epoch 2
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "timed out waiting for the paused step"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "checkpoint saved in epoch 2 after step 2" in stderr and "Traceback" not in stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    monkeypatch.syspath_prepend(str(BYO_DIR))
    train(load_config(str(cfg)), out, resume=True, progress=False)
    _assert_same_run(reference, out)


class _Crash(Exception):
    """Stands in for a kill: nothing of the run's own code runs after it."""


@contextlib.contextmanager
def _crash_at_step(step: int, monkeypatch) -> Iterator[None]:
    """Within the block, the trainer's ``step``-th step (1-based) raises :class:`_Crash`, which the block expects;
    the trainer's step is restored after it."""
    original, count = Trainer._step, [0]

    def crashing(self, *args):
        count[0] += 1
        if count[0] == step:
            raise _Crash
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_step", crashing)
    with pytest.raises(_Crash):
        yield
    monkeypatch.setattr(Trainer, "_step", original)


def test_a_crash_after_an_epoch_then_resume_is_bit_identical(dropout_reference, tmp_path: Path, monkeypatch) -> None:
    """As kill -9: nothing is saved after epoch 1's checkpoint; the resumed run starts epoch 2 afresh."""
    cfg, reference = dropout_reference
    monkeypatch.syspath_prepend(str(BYO_DIR))
    out = tmp_path / "run"
    with _crash_at_step(5, monkeypatch):
        train(load_config(str(cfg), ["loader_workers=0"]), out, progress=False)
    assert (torch.load(out / "checkpoint.pt", weights_only=True)["epoch"], len(_metric_lines(out))) == (1, 1)
    # The worker count may change on resume (rundir.MAY_CHANGE): batches and their order do not depend on it.
    train(load_config(str(cfg), ["loader_workers=2"]), out, resume=True, progress=False)
    _assert_same_run(reference, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_stream_their_shares_and_evaluate_every_image_once(folder: Path, tmp_path: Path, mode: str) -> None:
    """Under torchrun (2 gloo ranks) each rank decodes its half of every batch and of the test set; the summed
    counts are one process's evaluation of the saved model. Under FSDP the test set has 11 images, so rank 1 has
    one evaluation batch fewer and runs a blank forward to keep FSDP's all-gathers in step."""
    changes: dict = {"epochs": 1, "loader_workers": 1}
    if mode == "fsdp":
        shutil.copytree(folder, tmp_path / "data")
        folder = tmp_path / "data"
        (folder / "val" / "ant" / "ant_0.jpg").unlink()
        changes.update(distributed="fsdp", perturbation="global")
    cfg = _config(tmp_path / "cfg.yaml", folder, **changes)
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(
        [*launcher, "-m", "sharpness", "train", str(cfg), "--out", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distributed"]["world_size"] == 2 and summary["classes"] == sorted(CLASSES)
    trainer = Trainer(load_config(str(cfg)), tmp_path / "unused", progress=False)
    trainer._setup()
    trainer.model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    alone = trainer.evaluate()
    metrics = summary["metrics"]
    assert metrics["test_error"] == alone["error"] and metrics["test_top5_error"] == alone["top5_error"]
    assert metrics["test_loss"] == pytest.approx(alone["loss"], rel=1e-5)


def test_decoder_dali_trains_and_a_crash_then_resume_is_bit_identical(
    folder: Path, tmp_path: Path, monkeypatch
) -> None:
    """decoder: dali (on the CPU here): the crops are the package's draws and DALI's decode is deterministic, so
    a run killed after epoch 1 and resumed with another thread count ends as the uninterrupted run."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI has wheels for Linux only")  # the test extra has it
    cfg = _config(tmp_path / "cfg.yaml", folder, decoder="dali", loader_workers=1, epochs=2)
    reference = tmp_path / "reference"
    assert main(["train", str(cfg), "--out", str(reference)]) == 0
    out = tmp_path / "run"
    with _crash_at_step(4, monkeypatch):
        train(load_config(str(cfg)), out, progress=False)
    train(load_config(str(cfg), ["loader_workers=2"]), out, resume=True, progress=False)
    _assert_same_run(reference, out)


def test_decoder_dali_without_dali_fails_in_one_line(folder: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    out = tmp_path / "run"
    assert main(["train", str(_config(tmp_path / "cfg.yaml", folder, decoder="dali")), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err == "sharpness train: error: decoder 'dali' needs NVIDIA DALI: pip install 'sharpness[dali]' "
        "(nvidia-dali-cuda120, Linux x86_64)\n"
    )
    assert not out.exists()
