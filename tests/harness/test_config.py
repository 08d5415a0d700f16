"""Configs: one clear line per mistake, the paper's hyperparameters in the bundled files."""

from __future__ import annotations

import pytest

from sharpness.harness.config import ConfigError, TrainConfig, apply_overrides, bundled_configs, load_config


def test_every_bundled_config_loads_and_validates():
    names = bundled_configs()
    assert len(names) >= 40
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
        ("method=adam", "method must be one of sgd, sam; got 'adam'"),
        ("precision=fp8", "precision must be one of fp32, bf16, fp16"),
        ("rho=-0.1", "rho must be a number >= 0"),
        ("label_noise=1.5", "label_noise must be in [0, 1)"),
        ("colour=red", "unknown key 'colour'; allowed keys: name, dataset"),
        ("p=1", "p must be in (1, inf]"),
        ("eval_on=val", "eval_on: val needs val_fraction > 0"),
        ("epochs", "must look like key=value"),
    ],
)
def test_bad_values_get_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(TrainConfig(), [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_parse_yaml_values():
    cfg = apply_overrides(TrainConfig(), ["milestones=[0.5, 0.75]", "adaptive=true", "grad_clip=5", "p=inf"])
    assert cfg.milestones == [0.5, 0.75] and cfg.adaptive is True and cfg.grad_clip == 5.0
    assert cfg.p == float("inf")


def test_unknown_config_name_lists_the_bundled_ones(tmp_path):
    with pytest.raises(ConfigError, match="bundled: "):
        load_config("no-such-config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
