"""Models brought by import path (package.module:factory): building, one-line errors, training through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sharpness.cli.main import main
from sharpness.harness.config import ConfigError, load_config
from sharpness.harness.models import build_model
from sharpness.harness.models.external import ExternalModelError, check_external_name, is_external
from sharpness.harness.models.registry import check_model_options

BYO = "tests.harness.models.byo_model:make"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    # `python -m pytest` puts the working directory on sys.path; a bare `pytest` run may not.
    monkeypatch.syspath_prepend(str(REPO))


def test_builds_with_num_classes_and_options() -> None:
    model = build_model(BYO, 7, 3, width=4)  # make() names in_channels, so it is given the data's
    assert isinstance(model, nn.Sequential)
    assert model[0].in_channels == 3 and model[0].out_channels == 4
    assert model[-1].out_features == 7
    assert model(torch.zeros(2, 3, 5, 5)).shape == (2, 7)


def test_name_form() -> None:
    assert is_external(BYO) and not is_external("resnet50")
    assert check_external_name(" timm.models:efficientnet_b7 ") == ("timm.models", "efficientnet_b7")
    assert check_external_name("a.b:C.create") == ("a.b", "C.create")
    check_model_options(BYO, {"width": 4})  # the form only: nothing is imported
    for bad in ["a.b:", ":make", "a b:make", "a.b:make:x", "a..b:make"]:
        with pytest.raises(ExternalModelError, match="expected an import path package.module:factory"):
            check_external_name(bad)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        (
            "tests.harness.models.no_such_module:make",
            {},
            "model 'tests.harness.models.no_such_module:make': cannot import module "
            "'tests.harness.models.no_such_module' (No module named 'tests.harness.models.no_such_module')",
        ),
        (
            "tests.harness.models.byo_model:build",
            {},
            "model 'tests.harness.models.byo_model:build': module 'tests.harness.models.byo_model' has no "
            "attribute 'build'",
        ),
        (
            "tests.harness.models.byo_model:NOT_CALLABLE",
            {},
            "model 'tests.harness.models.byo_model:NOT_CALLABLE': 'NOT_CALLABLE' is a int, not callable",
        ),
        (
            "tests.harness.models.byo_model:not_a_model",
            {},
            "model 'tests.harness.models.byo_model:not_a_model': the factory returned a dict, not an nn.Module",
        ),
        (
            BYO,
            {"depth": 3},
            f"model '{BYO}': the factory cannot be called with (num_classes, depth, in_channels): "
            "got an unexpected keyword argument 'depth'",
        ),
    ],
)
def test_one_line_errors(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ExternalModelError) as info:
        build_model(name, 10, **kwargs)
    assert str(info.value) == message


def test_config_accepts_the_import_path_and_rejects_a_malformed_one() -> None:
    config = load_config("demo-digits", [f"model={BYO}", "model_kwargs={width: 4}"])
    assert config.model == BYO
    with pytest.raises(ConfigError, match="expected an import path"):
        load_config("demo-digits", ["model=tests..harness:make"])


def test_trains_through_sharpness_train(tmp_path) -> None:
    out = tmp_path / "run"
    sets = [f"model={BYO}", "model_kwargs={width: 4}", "epochs=1", "batch_size=128"]
    assert (
        main(["train", "demo-digits", "--out", str(out), "--device", "cpu", *sum((["--set", s] for s in sets), [])])
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model"] == BYO and summary["epochs"] == 1
    state = torch.load(out / "model.pt", weights_only=True)
    assert sorted(state) == ["0.bias", "0.weight", "4.bias", "4.weight"]
    assert state["0.weight"].shape == (4, 1, 3, 3)
