"""Wide ResNets (with and without BatchNorm), CIFAR ResNets with option-A shortcuts, ResNet-18."""

import torch
import torch.nn.functional as F
from torch import nn

from sharpness.harness.models import build_model
from sharpness.harness.models.resnet import BasicBlock


def test_wrn_layout() -> None:
    model = build_model("wrn-16-8", 10)
    assert len(model.blocks) == 6
    assert [b.conv1.out_channels for b in model.blocks] == [128, 128, 256, 256, 512, 512]
    assert [b.conv1.stride[0] for b in model.blocks] == [1, 1, 2, 1, 2, 1]
    assert [b.shortcut is not None for b in model.blocks] == [True, False, True, False, True, False]
    assert model.fc.in_features == 512
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    # He initialisation with fan_out = 3 * 3 * 512 in the last stage.
    assert abs(model.blocks[5].conv2.weight.std().item() - (2 / 4608) ** 0.5) < 0.001
    assert all(m.weight.eq(1).all() and m.bias.eq(0).all() for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_wrn_width_one_keeps_identity_shortcut_in_first_stage() -> None:
    model = build_model("wrn-10-1", 10)
    assert [b.shortcut is None for b in model.blocks] == [True, False, False]


def test_wrn_without_batchnorm() -> None:
    model = build_model("wrn-16-4", 10, norm="none")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 6 * 2 + 3
    assert all(m.bias is not None and m.bias.eq(0).all() for m in convs)
    assert all(b.conv2.weight.eq(0).all() for b in model.blocks)
    assert all(b.conv1.weight.ne(0).all() for b in model.blocks)
    with_bn = build_model("wrn-16-4", 10)
    bn_params = sum(p.numel() for m in with_bn.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    bias_params = sum(m.bias.numel() for m in convs)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in with_bn.parameters()) - bn_params + bias_params


def test_wrn_without_batchnorm_trains() -> None:
    torch.manual_seed(0)
    model = build_model("wrn-10-2", 3, norm="none")
    x = torch.randn(32, 3, 8, 8)
    y = torch.arange(32) % 3
    x[torch.arange(32), y] += 1.0  # the label is the brightest colour channel
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 1.0
    assert losses[-1] < 0.1 * losses[0]


def test_wrn_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = build_model("wrn-10-1", 10, dropout=0.5)
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert not torch.allclose(first, model(x))
    model.eval()
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert torch.equal(first, model(x))


def test_cifar_resnet_layout() -> None:
    model = build_model("resnet32", 10)
    assert len(model.blocks) == 15
    assert [b.conv1.out_channels for b in model.blocks] == [16] * 5 + [32] * 5 + [64] * 5
    assert [i for i, b in enumerate(model.blocks) if b.conv1.stride[0] == 2] == [5, 10]
    # Option A: no parameters outside the convolutions, BatchNorms and classifier.
    assert all(sum(p.numel() for p in b.shortcut.parameters()) == 0 for b in model.blocks)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 31
    assert len(build_model("resnet110", 10).blocks) == 54


def test_option_a_shortcut_subsamples_and_pads_with_zeros() -> None:
    block = BasicBlock(1, 3, stride=2, shortcut="A")
    x = torch.arange(16.0).view(1, 1, 4, 4)
    expected = torch.zeros(1, 3, 2, 2)
    expected[0, 0] = torch.tensor([[0.0, 2.0], [8.0, 10.0]])
    assert torch.equal(block.shortcut(x), expected)


def test_basic_block_is_post_activation() -> None:
    torch.manual_seed(0)
    block = BasicBlock(4, 4, stride=1).eval()
    x = torch.randn(2, 4, 5, 5)
    inner = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    assert torch.equal(block(x), F.relu(inner + x))


def test_resnet18_layout() -> None:
    model = build_model("resnet18", 10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [b.conv1.out_channels for b in model.blocks] == [64, 64, 128, 128, 256, 256, 512, 512]
    projections = [i for i, b in enumerate(model.blocks) if not isinstance(b.shortcut, nn.Identity)]
    assert projections == [2, 4, 6]
    assert isinstance(model.blocks[2].shortcut[0], nn.Conv2d)
    assert model.fc.in_features == 512
