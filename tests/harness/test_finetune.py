"""Finetuning: weights files of every supported kind, the classifier replaced for another class count, one-line
errors, frozen layers bit-identical after SAM steps (their BatchNorm statistics included), per-group rates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpness import SAM
from sharpness.harness.finetune import (
    PretrainedError,
    detect_head,
    freeze,
    freeze_bn_stats,
    load_pretrained,
    param_groups,
    read_state_dict,
)
from sharpness.harness.models import build_model


def _pretrained(tmp_path: Path, num_classes: int = 10) -> tuple[nn.Module, Path]:
    """A ResNet-20 with trained-looking weights (random, and BatchNorm statistics moved), saved as a run's model.pt."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.train()(torch.randn(8, 3, 16, 16))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_same_classes_load_everything_strictly(tmp_path: Path) -> None:
    source, path = _pretrained(tmp_path)
    model = build_model("resnet20", 10)
    report = load_pretrained(model, path)
    assert (report.head, report.head_replaced, report.loaded) == ("fc", False, len(source.state_dict()))
    assert report.summary() == f"loaded {report.loaded} tensors, classifier 'fc' included"
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_other_class_count_reinitialises_the_head(tmp_path: Path) -> None:
    source, path = _pretrained(tmp_path)
    torch.manual_seed(5)
    model = build_model("resnet20", 4)
    fresh_head = {k: v.clone() for k, v in model.fc.state_dict().items()}
    report = load_pretrained(model, path)
    assert report.head_replaced and (report.file_classes, report.model_classes) == (10, 4)
    assert (
        report.summary()
        == f"loaded {report.loaded} tensors; classifier 'fc' re-initialised for 4 classes (the file has 10 classes)"
    )
    state, src = model.state_dict(), source.state_dict()
    assert report.loaded == len(src) - 2
    assert all(torch.equal(state[k], src[k]) for k in state if not k.startswith("fc."))
    assert torch.equal(model.fc.weight, fresh_head["weight"]) and torch.equal(model.fc.bias, fresh_head["bias"])


def test_a_backbone_without_classifier_gets_a_fresh_head(tmp_path: Path) -> None:
    source, _ = _pretrained(tmp_path)
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}, tmp_path / "backbone.pt")
    model = build_model("resnet20", 10)
    report = load_pretrained(model, tmp_path / "backbone.pt")
    assert report.head_replaced and report.file_classes is None
    assert report.summary().endswith("re-initialised for 10 classes (the file has none)")
    assert torch.equal(model.conv1.weight, source.conv1.weight) and not torch.equal(model.fc.weight, source.fc.weight)


def test_harness_checkpoint_ddp_prefix_and_safetensors(tmp_path: Path) -> None:
    source, _ = _pretrained(tmp_path)
    state = source.state_dict()
    torch.save({"epoch": 3, "model": state, "optimizer": {}}, tmp_path / "checkpoint.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    from safetensors.torch import save_file  # installed with the [test] extra

    save_file(state, str(tmp_path / "model.safetensors"))
    files = [tmp_path / "checkpoint.pt", tmp_path / "ddp.pt", tmp_path / "model.safetensors"]
    for path in files:
        read = read_state_dict(path)
        assert sorted(read) == sorted(state) and all(torch.equal(read[k], state[k]) for k in state), path
        model = build_model("resnet20", 10)
        load_pretrained(model, path)
        assert torch.equal(model.blocks[3].conv2.weight, source.blocks[3].conv2.weight)


def test_mismatched_weights_fail_in_one_line(tmp_path: Path) -> None:
    _, path = _pretrained(tmp_path)
    with pytest.raises(PretrainedError) as info:
        load_pretrained(build_model("resnet32", 10), path)  # 5 blocks per stage instead of 3
    message = str(info.value)
    assert message == (
        f"{path}: does not fit CifarResNet: keys 72 missing (blocks.10.bn1.bias, blocks.10.bn1.num_batches_tracked, "
        "blocks.10.bn1.running_mean and 69 more); 51 of other shapes (blocks.3.bn1.bias: (32,) vs (16,))"
    )
    torch.save({"conv1.weight": torch.zeros(1), "extra.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(
        PretrainedError, match="1 unexpected \\(extra.weight\\); 1 of other shapes \\(conv1.weight: \\(1,\\)"
    ):
        load_pretrained(build_model("resnet20", 10), tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(PretrainedError, match="not a torch weights file readable with weights_only=True"):
        read_state_dict(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="init_from: no file"):
        read_state_dict(tmp_path / "none.pt")


def test_frozen_layers_stay_bit_identical_under_sam_finetuning(tmp_path: Path) -> None:
    _, path = _pretrained(tmp_path)
    torch.manual_seed(1)
    model = build_model("resnet20", 4)
    load_pretrained(model, path)
    frozen = freeze(model, ["conv1.*", "bn1.*", "blocks.[0-2].*"])  # the stem and the first stage
    assert len(frozen) == 3 + 3 * 6 and frozen[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = param_groups(model, lr=0.1, backbone_lr_scale=0.1)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("head", 0.1, 2), ("backbone", 0.1 * 0.1, 36)]
    opt = SAM(groups, torch.optim.SGD, rho=0.05, momentum=0.9, weight_decay=5e-4, model=model)
    gen = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(3):
        x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    after = model.state_dict()
    frozen_part = ("conv1.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2.")
    for key, value in after.items():
        if key.startswith(frozen_part):  # weights and BatchNorm statistics alike
            assert torch.equal(value, before[key]), key
        elif key.endswith(("weight", "bias", "running_mean", "running_var")):
            assert not torch.equal(value, before[key]), key
    assert model.training and model.bn1.training is False and model.blocks[3].bn1.training


def test_freeze_bn_stats_keeps_the_affine_parameters_trainable() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 4)
    names = freeze_bn_stats(model)
    assert len(names) == 19 and names[0] == "bn1"
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model.train()
    out = model(torch.randn(4, 3, 8, 8))
    out.sum().backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert model.bn1.weight.grad is not None and model.bn1.weight.requires_grad
    model.eval()
    assert torch.allclose(model(torch.ones(2, 3, 8, 8)), model.train()(torch.ones(2, 3, 8, 8)))
    freeze_bn_stats(model, ["bn1"])  # again: no second hook
    assert len(model.bn1._forward_pre_hooks) == 1
    with pytest.raises(ValueError, match="'fc' is a Linear, not a BatchNorm layer"):
        freeze_bn_stats(model, ["fc"])


def test_freeze_rejects_a_pattern_matching_nothing() -> None:
    model = build_model("resnet20", 4)
    with pytest.raises(
        ValueError, match="freeze: pattern 'layer1.\\*' matches no parameter \\(names look like 'conv1.weight'\\)"
    ):
        freeze(model, ["layer1.*"])
    assert all(p.requires_grad for p in model.parameters())


def test_head_detection_and_groups_without_a_backbone() -> None:
    class Timmish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Linear(3, 5)
            self.classifier = nn.Linear(5, 2)
            self.aux = nn.Linear(2, 2)

        def get_classifier(self) -> nn.Module:
            return self.classifier

    assert detect_head(Timmish()) == "classifier"
    assert detect_head(build_model("resnet20", 3)) == "fc"
    assert detect_head(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))) == "2"
    with pytest.raises(PretrainedError, match="Conv2d has no nn.Linear classifier; name it with head="):
        detect_head(nn.Conv2d(1, 1, 1))
    model = build_model("resnet20", 3)
    freeze(model, ["conv1.*", "bn1.*", "blocks.*"])
    assert [g["name"] for g in param_groups(model, 0.01, 0.1)] == ["head"]
