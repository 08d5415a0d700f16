"""Finetuning a pretrained model: load its weights, replace the classifier, freeze layers, a lower backbone lr.

The SAM paper's Table 3 (Foret et al., ICLR 2021, Section 3.2 and Appendix C.2) finetunes ImageNet-pretrained
EfficientNets: the weights come from the checkpoint "except the last dense layer, which change size to accommodate
the new number of classes, that is randomly initialized", and "we freeze the batch norm statistics and use them
for normalization" (:func:`freeze_bn_stats`). For ImageNet itself the checkpoint's classifier is kept.

Frozen BatchNorm: a BatchNorm layer whose statistics are frozen normalises with its running mean and variance and
never updates them, in ``model.train()`` too. This is done here by a forward pre-hook that puts the layer in eval
mode before each call, so the trainer needs nothing of its own: ``model.train()`` may set the flag, the hook resets
it. :func:`freeze` freezes the statistics of every BatchNorm layer whose parameters it freezes (a frozen part
changes by nothing, its batch statistics included); :func:`freeze_bn_stats` freezes those of any layers (the
paper's recipe: all), leaving their affine parameters trainable.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "PretrainedError",
    "LoadReport",
    "read_state_dict",
    "detect_head",
    "load_pretrained",
    "freeze",
    "freeze_bn_stats",
    "param_groups",
]

_PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel and by torch.compile's wrapper


class PretrainedError(ValueError):
    """The pretrained weights do not fit the model; the message is one line saying which keys."""


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did: the tensors loaded, the classifier's name, and whether it was replaced
    (its class count in the file and in the model)."""

    loaded: int
    head: str
    head_replaced: bool
    file_classes: int | None
    model_classes: int | None

    def summary(self) -> str:
        if self.head_replaced:
            had = "has none" if self.file_classes is None else f"has {self.file_classes} classes"
            return (
                f"loaded {self.loaded} tensors; classifier {self.head!r} re-initialised for {self.model_classes} "
                f"classes (the file {had})"
            )
        return f"loaded {self.loaded} tensors, classifier {self.head!r} included"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, on the CPU, without running code from it.

    ``.safetensors`` files are read with the ``safetensors`` package (``pip install 'sharpness[finetune]'``);
    anything else with ``torch.load(weights_only=True)``: a state dict, or a dict holding one under ``"model"``
    (the harness's ``checkpoint.pt``) or ``"state_dict"``; ``model.pt`` of a run is a state dict. Key prefixes
    ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile) are removed where every key has them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no file {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise ImportError(f"{path}: reading .safetensors needs: pip install 'sharpness[finetune]'") from err
        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise PretrainedError(f"{path}: not a torch weights file readable with weights_only=True ({err})") from err
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedError(f"{path}: expected a mapping of names to tensors (a state dict)")
    out = dict(state)
    for prefix in _PREFIXES:  # only where every key has it: a model may have a submodule called "module"
        if out and all(key.startswith(prefix) for key in out):
            out = {key[len(prefix) :]: value for key, value in out.items()}
    return out


def detect_head(model: nn.Module) -> str:
    """The name of ``model``'s classifier: the module ``get_classifier()`` returns where the model has it (timm's
    models), else its last ``nn.Linear`` (``fc`` of the ResNets, ``classifier`` or ``head`` elsewhere)."""
    modules = dict(model.named_modules())
    if callable(getattr(model, "get_classifier", None)):
        head = model.get_classifier()
        for name, module in modules.items():
            if module is head and name:
                return name
    linear = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    if not linear:
        raise PretrainedError(f"{type(model).__name__} has no nn.Linear classifier; name it with head=")
    return linear[-1]


def _few(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _classes(state: dict[str, Tensor], head: str) -> int | None:
    weight = state.get(f"{head}.weight")
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def load_pretrained(model: nn.Module, path: str | Path, *, head: str | None = None) -> LoadReport:
    """Load the weights in ``path`` into ``model`` (built for the target's classes), strictly except for the head.

    ``head`` names the classifier module (default: :func:`detect_head`). Where the file's classifier tensors have
    other shapes than the model's (another class count), or the file has none (a backbone alone), they are left
    out and the model keeps the head it was built with, freshly initialised from the run's seed (Appendix C.2 of
    the SAM paper); otherwise they load too.
    Every other tensor of the model must be in the file with its shape, and the file must hold nothing else.

    Raises:
        PretrainedError: one line naming the first missing, unexpected or mis-shaped keys.
    """
    state = read_state_dict(path)
    head = head or detect_head(model)
    own = model.state_dict()
    head_keys = {k for k in own if k.startswith(f"{head}.")}
    if not head_keys:
        raise PretrainedError(f"model has no module {head!r} to use as the classifier")
    replace = any(k not in state or state[k].shape != own[k].shape for k in head_keys)
    file_classes = _classes(state, head)
    if replace:
        state = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    expected = set(own) - head_keys if replace else set(own)
    missing = expected - set(state)
    unexpected = set(state) - set(own)
    shapes = {k for k in expected & set(state) if state[k].shape != own[k].shape}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if shapes:
        k = sorted(shapes)[0]
        problems.append(f"{len(shapes)} of other shapes ({k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
    if problems:
        raise PretrainedError(f"{path}: does not fit {type(model).__name__}: keys " + "; ".join(problems))
    model.load_state_dict(state, strict=not replace)
    return LoadReport(len(state), head, replace, file_classes, _classes(own, head))


def _frozen_bn_hook(module: nn.Module, args: Any) -> None:
    module.training = False


def freeze_bn_stats(model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
    """Freeze the statistics of ``model``'s BatchNorm layers (those called ``names``, default all): they normalise
    with their running statistics and never update them, in train mode too. Returns the layers' names."""
    modules = dict(model.named_modules())
    chosen = [n for n, m in modules.items() if isinstance(m, _BatchNorm)] if names is None else list(names)
    for name in chosen:
        module = modules[name]
        if not isinstance(module, _BatchNorm):
            raise ValueError(f"{name!r} is a {type(module).__name__}, not a BatchNorm layer")
        if not getattr(module, "_sharpness_stats_frozen", False):
            module.register_forward_pre_hook(_frozen_bn_hook)
            module._sharpness_stats_frozen = True
        module.eval()
    return chosen


def freeze(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Stop training the parameters whose names match any of the glob ``patterns`` (``fnmatch``: ``layer1.*``,
    ``conv1.*``, ``bn1.*``): ``requires_grad`` becomes False, and BatchNorm layers all of whose parameters are
    frozen also get their statistics frozen (:func:`freeze_bn_stats`). Returns the frozen parameters' names.

    Leave frozen parameters out of the optimizer (:func:`param_groups` does), so that neither weight decay nor
    momentum moves them. A pattern that matches no parameter raises ``ValueError`` (a typo would train all).
    """
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"freeze: pattern {pattern!r} matches no parameter (names look like {names[0]!r})")
    frozen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    params = dict(model.named_parameters())
    for name in frozen:
        params[name].requires_grad_(False)
    bn = []
    for name, module in model.named_modules():
        own = list(module.parameters())
        if isinstance(module, _BatchNorm) and own and not any(p.requires_grad for p in own):
            bn.append(name)
    freeze_bn_stats(model, bn)
    return frozen


def param_groups(
    model: nn.Module, lr: float, backbone_lr_scale: float = 1.0, *, head: str | None = None
) -> list[dict[str, Any]]:
    """Optimizer parameter groups (the form ``torch.optim`` takes): the classifier's trainable parameters at
    ``lr`` first, then the rest at ``lr * backbone_lr_scale``; frozen parameters are left out, and so is a group
    left empty. ``head`` as in :func:`load_pretrained`. Each group is named (``"head"``, ``"backbone"``)."""
    if backbone_lr_scale < 0:
        raise ValueError(f"backbone_lr_scale must be >= 0, got {backbone_lr_scale}")
    head = head or detect_head(model)
    groups: dict[str, list[nn.Parameter]] = {"head": [], "backbone": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups["head" if name.startswith(f"{head}.") else "backbone"].append(param)
    if not groups["head"]:
        raise ValueError(f"no trainable parameters in the classifier {head!r}")
    rates = {"head": lr, "backbone": lr * backbone_lr_scale}
    return [{"params": ps, "lr": rates[name], "name": name} for name, ps in groups.items() if ps]
