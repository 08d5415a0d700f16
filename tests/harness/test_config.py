"""Configs: one clear line per mistake, the paper's hyperparameters in the bundled files."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sharpness.harness.augment import POLICIES
from sharpness.harness.build import build_schedule
from sharpness.harness.config import (
    _CHOICES,
    CONFIG_HELP,
    ConfigError,
    TrainConfig,
    apply_overrides,
    bundled_configs,
    keys_help,
    load_config,
)


def test_every_bundled_config_loads_and_validates():
    names = bundled_configs()
    assert len(names) >= 40
    assert sum(name.startswith(("imagenet_resnet", "finetune_effnet")) for name in names) == 27  # Tables 2 and 3
    for name in names:
        assert isinstance(load_config(name), TrainConfig)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10_wrn28-10_basic", dict(epochs=200, lr=0.1, weight_decay=5e-4, rho=0.05, batch_size=256)),
        ("cifar100_wrn28-10_cutout", dict(epochs=200, lr=0.1, weight_decay=5e-4, rho=0.1)),
        ("cifar10_wrn28-10-1800ep_basic", dict(epochs=1800, lr=0.05, weight_decay=1e-3)),
        ("cifar10_shake-shake-26-2x96d_basic", dict(lr=0.02, weight_decay=1e-3, rho=0.02)),
        ("cifar100_shake-shake-26-2x96d_basic", dict(rho=0.05)),
        ("cifar10_pyramidnet-272-200_basic", dict(lr=0.05, weight_decay=5e-4, rho=0.05)),
        ("cifar100_pyramidnet-272-200_basic", dict(rho=0.2)),
        ("cifar10_pyramidnet-272-200-shakedrop_autoaugment", dict(lr=0.02, rho=0.05)),
        ("cifar100_pyramidnet-272-200-shakedrop_autoaugment", dict(lr=0.05, rho=0.05)),
        ("svhn_wrn28-10_basic", dict(lr=0.01, weight_decay=5e-4, rho=0.01)),
        ("fashion_mnist_wrn28-10_basic", dict(lr=0.1, weight_decay=5e-4, rho=0.05)),
        ("cifar10_resnet32_noise40", dict(model="resnet32", epochs=200, rho=0.1, label_noise=0.4)),
        ("cifar10_resnet32_noise80", dict(rho=0.05, label_noise=0.8)),
        ("cifar10_wrn16-8_noise40", dict(model="wrn-16-8", epochs=30, precision="bf16", label_noise=0.4)),
        # Appendix C.1, Table 7; SVHN on train + extra (Appendix B.1); Fashion-MNIST's "auto augment" is cutout
        ("svhn_wrn28-10_basic", dict(dataset="svhn_extra", lr=0.01, weight_decay=5e-4, rho=0.01, batch_size=256)),
        (
            "svhn_shake-shake-26-2x96d_basic",
            dict(dataset="svhn_extra", model="shake-shake-26-2x96d", lr=0.01, rho=0.01),
        ),
        ("svhn_shake-shake-26-2x96d_autoaugment", dict(augment="autoaugment", autoaugment_policy="svhn", rho=0.01)),
        ("fashion_mnist_wrn28-10_autoaugment", dict(augment="cutout", lr=0.1, rho=0.05)),
        ("fashion_mnist_shake-shake-26-2x96d_basic", dict(model="shake-shake-26-2x96d", lr=0.1, rho=0.02)),
        ("fashion_mnist_shake-shake-26-2x96d_autoaugment", dict(augment="cutout", weight_decay=5e-4, rho=0.02)),
        ("cifar10_wrn16-8_cutout_120ep", dict(model="wrn-16-8", epochs=120, augment="cutout", warmup_epochs=18)),
        # Table 2 (Section 3.1, Appendix C.1) and Table 3 (Appendix C.2), streamed from image folders
        (
            "imagenet_resnet50_100ep",
            dict(dataset="imagefolder", model="resnet50", batch_size=4096, lr=1.0, weight_decay=1e-4, epochs=100),
        ),
        ("imagenet_resnet152_400ep", dict(model="resnet152", epochs=400, label_smoothing=0.1, image_size=224)),
        (
            "finetune_effnet-b7_flowers",
            dict(batch_size=1024, lr=0.016, weight_decay=1e-5, train_steps=5000, freeze_bn_stats=True, image_size=600),
        ),
        ("finetune_effnet-l2_food101", dict(batch_size=512, lr=0.008, train_steps=10000)),
    ],
)
def test_paper_hyperparameters(name, expected):
    cfg = load_config(name)
    assert cfg.momentum == 0.9 and cfg.schedule == "cosine"
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize(
    "override, message",
    [
        ("epochs=abc", "epochs must be int; got 'abc'"),
        ("epochs=0", "epochs must be an integer >= 1; got 0"),
        (
            "method=adam",
            "method must be one of sgd, sam, gsam, looksam, msam, esam, fsam, vasso, interval, stochastic, aesam, "
            "random; got 'adam'",
        ),
        ("precision=fp8", "precision must be one of fp32, bf16, fp16"),
        ("rho=-0.1", "rho must be a number >= 0"),
        ("label_noise=1.5", "label_noise must be in [0, 1)"),
        ("colour=red", "unknown key 'colour'; allowed keys: name, dataset"),
        ("p=1", "p must be in (1, inf]"),
        ("eval_on=val", "eval_on: val needs val_fraction > 0"),
        ("epochs", "must look like key=value"),
        ("warmup_epochs=10.5", "warmup_epochs (10.5) must not exceed epochs (10)"),
        ("autoaugment_policy=imagenet", "autoaugment_policy must be one of cifar10, svhn; got 'imagenet'"),
        ("augment=mixup", "augment must be one of none, basic, cutout, autoaugment; got 'mixup'"),
        ("milestones=[0.5, 6]", "milestones mixes fractions of training (< 1) and epochs (>= 1): [0.5, 6.0]"),
        ("milestones=[0, 0.5]", "milestones must be numbers > 0"),
        ("model_kwargs={depth: 3}", "model_kwargs: model 'cnn-small' has no option 'depth'; it accepts width (int"),
        ("model_kwargs={width:4}", "no option 'width:4' (YAML needs a space after the colon: {width: 4}"),
        ("model_kwargs={width: 2.5}", "model_kwargs: width=2.5 does not fit model 'cnn-small'"),
        ("model=vgg16", "unknown model 'vgg16'; accepted names: wrn-<depth>-<width>"),
        ("dataset=stl10", "dataset: unknown data set 'stl10'; choose one of cifar10"),
        ("m_sharpness=0", "m_sharpness must be an integer >= 1 or null; got 0"),
        ("m_sharpness=48", "m_sharpness (48) must divide batch_size (128)"),
        ("seed=-1", "seed must be an integer >= 0; got -1"),
    ],
)
def test_bad_values_get_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["schedule=step", "milestones=[5, 12]"], "milestones [12.0] lie after the last epoch (10)"),
        (["method=sgd", "m_sharpness=32"], "m_sharpness needs method: sam"),
        (["second_order=true", "m_sharpness=32"], "m_sharpness does not combine with second_order: true"),
        (
            ["model=wrn-16-4", "model_kwargs={norm: layer}"],
            "norm='layer' does not fit model 'wrn-16-4'; it accepts "
            "dropout (float, default 0.0), norm (one of 'bn', 'none', default 'bn')",
        ),
    ],
)
def test_combinations_get_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_valid_options_pass():
    cfg = apply_overrides(
        TrainConfig(),
        ["model=wrn-16-4", "model_kwargs={dropout: 0.3, norm: none}", "m_sharpness=32", "warmup_epochs=10"],
    )
    assert cfg.model_kwargs == {"dropout": 0.3, "norm": "none"} and cfg.m_sharpness == 32
    assert apply_overrides(TrainConfig(), ["schedule=cosine", "milestones=[60, 120]"]).milestones == [60.0, 120.0]


def test_every_key_has_a_one_line_meaning():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(CONFIG_HELP) == sorted(names)
    assert all(text and "\n" not in text for text in CONFIG_HELP.values())
    lines = keys_help().splitlines()[1:]
    assert [line.split()[0] for line in lines] == names
    assert "  m_sharpness          SAM: one perturbation per subset of m examples" in keys_help()
    assert lines[names.index("milestones")].endswith("[[0.3, 0.6, 0.8]]")
    assert lines[names.index("cudnn_benchmark")].endswith("[true]")


def test_policy_choices_are_the_augmentations_policies():
    assert set(_CHOICES["autoaugment_policy"]) == set(POLICIES)


def _boundaries(milestones: list[float], epochs: int = 10, steps: int = 7) -> list[int]:
    cfg = apply_overrides(TrainConfig(), ["schedule=step", "gamma=0.5", f"epochs={epochs}", f"milestones={milestones}"])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = build_schedule(cfg, opt, steps)
    return [
        step for step in range(1, epochs * steps) if schedule.lr_lambdas[0](step) < schedule.lr_lambdas[0](step - 1)
    ]


def test_milestones_below_one_are_fractions_and_from_one_on_epochs():
    assert _boundaries([0.5, 0.8]) == [35, 56]  # of 70 steps
    assert _boundaries([5, 8]) == [35, 56]  # epochs of 7 steps
    assert _boundaries([1]) == [7]  # epoch 1, not the end of training
    assert _boundaries([2.5]) == [18]  # round(2.5 * 7)


def test_bundled_config_by_name_or_folder_and_name(tmp_path, monkeypatch):
    plain = load_config("cifar10_wrn16-8_noise40")
    assert plain.model == "wrn-16-8" and load_config("reduced/cifar10_wrn16-8_noise40") == plain
    with pytest.raises(ConfigError, match="did you mean reduced/cifar10_wrn16-8_noise40"):
        load_config("paper/cifar10_wrn16-8_noise40")
    # Anything else is a file path only: a missing file is never replaced by a bundled config.
    for missing in ["cifar10_wrn16-8_noise40.yaml", "x/reduced/cifar10_wrn16-8_noise40", str(tmp_path / "reduced/a")]:
        with pytest.raises(ConfigError, match="no bundled config of that name"):
            load_config(missing)
    # Files come first, with or without their .yaml.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reduced").mkdir()
    (tmp_path / "reduced" / "cifar10_wrn16-8_noise40.yaml").write_text("dataset: digits\nmodel: mlp\nepochs: 7\n")
    for local in ["reduced/cifar10_wrn16-8_noise40", "reduced/cifar10_wrn16-8_noise40.yaml"]:
        assert load_config(local).epochs == 7


def test_overrides_parse_yaml_values():
    cfg = apply_overrides(TrainConfig(), ["milestones=[0.5, 0.75]", "adaptive=true", "grad_clip=5", "p=inf"])
    assert cfg.milestones == [0.5, 0.75] and cfg.adaptive is True and cfg.grad_clip == 5.0
    assert cfg.p == float("inf")


def test_unknown_config_name_points_to_the_list_and_close_names(tmp_path):
    with pytest.raises(ConfigError, match=r"`sharpness configs` lists the \d+ bundled ones\)$"):
        load_config("no-such-config")
    with pytest.raises(ConfigError, match="did you mean cifar10_wrn16-8_noise40"):
        load_config("cifar10_wrn16-8_noise4")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
