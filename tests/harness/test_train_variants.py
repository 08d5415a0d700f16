"""Every method trains through the harness, and the harness's passes are the library's step exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sharpness import ESAM
from sharpness.cli.main import main
from sharpness.harness.config import METHOD_NAMES, load_config
from sharpness.harness.methods import METHODS
from sharpness.harness.train import Trainer

TINY = ["epochs=2", "train_subset=320", "batch_size=64", "model_kwargs={width: 4}", "device=cpu", "augment=none"]
STEPS = 320 // 64


def _weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


@pytest.mark.parametrize(
    ("method", "passes"),
    [("sgd", 1), ("sam", 2), ("looksam", (2 + 4 + 2 + 4) / 10), ("msam", 1), ("interval", 1.5), ("esam", 2)],
)
def test_each_method_trains_and_counts_its_passes(tmp_path, method, passes):
    out = tmp_path / method
    args = ["train", "demo-digits", "--out", str(out), "--no-progress", "--set", f"method={method}"]
    assert main([*args, *[a for s in TINY for a in ("--set", s)]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method
    assert summary["metrics"]["passes_per_step"] == pytest.approx(passes)
    assert summary["metrics"]["train_seconds"] > 0


def test_every_method_name_builds_its_optimizer():
    from sharpness.harness.build import build_optimizer

    model = torch.nn.Linear(3, 2)
    for method in METHOD_NAMES:
        opt = build_optimizer(load_config("demo-digits", [f"method={method}"]), model, total_steps=10)
        assert type(opt) is (torch.optim.SGD if method == "sgd" else METHODS[method].optimizer)


def _library_loop(cfg, optimizer_class):
    """The same run as the harness, with the library's closure form (``opt.step(closure)``) on the same batches."""
    ref = Trainer(cfg, "unused", progress=False)
    ref._setup()
    model, opt = ref.model, ref.optimizer
    assert type(opt) is optimizer_class
    for epoch in range(cfg.epochs):
        for images, labels in ref.train_set.shuffled(cfg.batch_size, cfg.seed, epoch):
            x = ref.augment.normalize(images)

            if isinstance(opt, ESAM):

                def closure(index=None, x=x, y=labels):
                    xs, ys = (x, y) if index is None else (x[index], y[index])
                    return F.cross_entropy(model(xs), ys, reduction="none")

            else:

                def closure(x=x, y=labels):
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

            opt.step(closure)
            opt.zero_grad(set_to_none=True)
            ref.schedule.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["gsam", "looksam", "msam", "esam", "fsam", "interval", "stochastic", "random"])
def test_the_harness_step_is_the_librarys_closure_step(tmp_path, method):
    cfg = load_config("demo-digits", [*TINY, f"method={method}"])
    Trainer(cfg, tmp_path / "run", progress=False).run()
    got = _weights(tmp_path / "run")
    want = _library_loop(cfg, METHODS[method].optimizer)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_variant_options_are_checked_when_the_config_loads():
    from sharpness.harness.config import ConfigError

    with pytest.raises(ConfigError, match="method looksam: k must be an integer >= 1"):
        load_config("demo-digits", ["method=looksam", "looksam_k=0"])
    with pytest.raises(ConfigError, match="ascent_steps and second_order are SAM's options"):
        load_config("demo-digits", ["method=gsam", "ascent_steps=2"])
