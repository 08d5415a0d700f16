"""One training run's configuration: a flat dataclass, read from YAML, overridable from the command line."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

__all__ = [
    "TrainConfig",
    "ConfigError",
    "CONFIG_HELP",
    "load_config",
    "bundled_configs",
    "apply_overrides",
    "keys_help",
]


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line saying what and what is allowed."""


# ``method``: the base optimizer alone, SAM, and its variants (sharpness.harness.methods.METHODS).
METHOD_NAMES = (
    "sgd",
    "sam",
    "gsam",
    "looksam",
    "msam",
    "esam",
    "fsam",
    "vasso",
    "interval",
    "stochastic",
    "aesam",
    "random",
)

_CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHOD_NAMES,
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("cosine", "step", "constant"),
    "precision": ("fp32", "bf16", "fp16"),
    "noise_kind": ("symmetric", "asymmetric"),
    "eval_on": ("test", "val"),
    "augment": ("none", "basic", "cutout", "autoaugment"),
    "autoaugment_policy": ("cifar10", "svhn"),
    "perturbation": ("per_replica", "global"),
    "distributed": ("ddp", "fsdp"),
    "decoder": ("pillow", "simplejpeg", "dali"),
    "normalization": ("dataset", "imagenet"),
}

#: The data set read from an image folder (``data_dir`` holds ``train/`` and ``val/``), streamed through a loader
#: (:mod:`sharpness.harness.streaming`) rather than held in memory; it has no :class:`DatasetSpec`.
IMAGEFOLDER = "imagefolder"
#: The keys of ``dataset: imagefolder`` alone (another data set refuses one changed from its default).
_IMAGEFOLDER_KEYS = ("image_size", "eval_resize", "decoder", "loader_workers", "labels_file")


@dataclass
class TrainConfig:
    """Everything that determines a run. ``method: sgd`` trains with the base optimizer alone.

    ``milestones`` (``schedule: step``): a value in (0, 1) is a fraction of the whole run, a value >= 1 an
    epoch (``[0.5, 0.75]`` and ``[60, 120]`` with ``epochs: 160`` both decay at half and three quarters of
    training; one list may not mix the two). ``m_sharpness`` trains with one perturbation per subset of m
    examples of each batch (Foret et al., §4.1; null: one for the whole batch, plain SAM).
    :data:`CONFIG_HELP` says in one line what each key means.
    """

    name: str = "run"
    # data
    dataset: str = "digits"
    data_dir: str | None = None
    train_subset: int | None = None
    label_noise: float = 0.0
    noise_kind: str = "symmetric"
    val_fraction: float = 0.0
    eval_on: str = "test"
    augment: str = "basic"
    autoaugment_policy: str = "cifar10"
    cutout_size: int = 16
    hflip: bool = True
    upscale_to: int | None = None
    normalization: str = "dataset"
    # image folders (dataset: imagefolder)
    image_size: int = 224
    eval_resize: int = 256
    decoder: str = "pillow"
    loader_workers: int = 8
    labels_file: str | None = None
    # model
    model: str = "cnn-small"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # finetuning (paper Table 3, Appendix C.2)
    init_from: str | None = None
    head: str | None = None
    freeze: list[str] = field(default_factory=list)
    freeze_bn_stats: bool = False
    backbone_lr_scale: float = 1.0
    # optimisation
    method: str = "sam"
    label: str | None = None
    optimizer: str = "sgd"
    epochs: int = 10
    train_steps: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.8])
    gamma: float = 0.2
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    # SAM
    rho: float = 0.05
    p: float = 2.0
    adaptive: bool = False
    eta: float = 0.01
    ascent_steps: int = 1
    second_order: bool = False
    m_sharpness: int | None = None
    # SAM variants (each read by the method it names)
    gsam_alpha: float = 0.4
    rho_min: float | None = None
    looksam_k: int = 5
    looksam_alpha: float = 0.7
    esam_beta: float = 0.5
    esam_gamma: float = 0.5
    fsam_sigma: float = 1.0
    fsam_lambda: float = 0.9
    vasso_theta: float = 0.9
    interval_k: int = 2
    sam_probability: float = 0.5
    aesam_c_start: float = 1.0
    aesam_c_end: float = -1.0
    aesam_decay: float = 0.9
    # label-noise bootstrapping (paper Table 4): retrain on the first model's predicted training labels
    bootstrap: bool = False
    # execution
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = True
    eval_batch_size: int = 1000
    eval_every: int = 1
    top5: bool | None = None
    # data-parallel runs under torchrun (docs/distributed.md); one process ignores both
    perturbation: str = "per_replica"
    distributed: str = "ddp"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        for key in ("epochs", "batch_size", "ascent_steps", "eval_batch_size", "eval_every", "cutout_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1; got {value!r}")
        for key in ("train_subset", "train_steps"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{key} must be an integer >= 1 or null; got {value!r}")
        for key in ("lr", "eta"):
            if not _finite(getattr(self, key)) or getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be a number > 0; got {getattr(self, key)!r}")
        for key in ("momentum", "weight_decay", "rho", "warmup_epochs", "label_smoothing", "gamma"):
            if not _finite(getattr(self, key)) or getattr(self, key) < 0:
                raise ConfigError(f"{key} must be a number >= 0; got {getattr(self, key)!r}")
        for key in ("label_noise", "val_fraction"):
            if not _finite(getattr(self, key)) or not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key} must be in [0, 1); got {getattr(self, key)!r}")
        if not (_finite(self.p) or self.p == math.inf) or self.p <= 1:
            raise ConfigError(f"p must be in (1, inf]; got {self.p!r}")
        if self.grad_clip is not None and (not _finite(self.grad_clip) or self.grad_clip <= 0):
            raise ConfigError(f"grad_clip must be a number > 0 or null; got {self.grad_clip!r}")
        if self.eval_on == "val" and self.val_fraction == 0:
            raise ConfigError("eval_on: val needs val_fraction > 0 (the paper holds out 10% to choose rho)")
        if self.method not in ("sam", "sgd") and (self.ascent_steps != 1 or self.second_order):
            raise ConfigError(f"ascent_steps and second_order are SAM's options; method {self.method} has neither")
        self._validate_method_options()
        if self.second_order and (self.precision == "fp16" or self.ascent_steps != 1):
            raise ConfigError(
                "second_order needs ascent_steps: 1 and precision fp32 or bf16 (its closure form does not run "
                "under GradScaler)"
            )
        if self.bootstrap and self.label_noise == 0:
            raise ConfigError("bootstrap: true only makes sense with label_noise > 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0; got {self.seed!r}")
        if self.warmup_epochs > self.epochs and self.train_steps is None:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs:g}) must not exceed epochs ({self.epochs})")
        self._validate_milestones()
        self._validate_m_sharpness()
        self._validate_distributed()
        self._validate_data()
        self._validate_finetune()
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f"model_kwargs must be a mapping; got {self.model_kwargs!r}")
        from sharpness.harness.models.registry import check_model_options  # torch: imported when validating

        try:
            check_model_options(self.model, self.model_kwargs)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _validate_milestones(self) -> None:
        values = self.milestones
        if any(not _finite(m) or m <= 0 for m in values):
            raise ConfigError(f"milestones must be numbers > 0; got {values!r}")
        fractions = [m for m in values if m < 1]
        if fractions and len(fractions) != len(values):
            raise ConfigError(
                f"milestones mixes fractions of training (< 1) and epochs (>= 1): {values!r}; use one kind"
            )
        late = [m for m in values if m >= 1 and m > self.epochs]
        if late and self.schedule == "step" and self.train_steps is None:
            raise ConfigError(f"milestones {late!r} lie after the last epoch ({self.epochs})")

    def _validate_data(self) -> None:
        """The data set's keys: a :class:`DatasetSpec` name, or ``imagefolder`` with its loader's options."""
        if self.dataset != IMAGEFOLDER:
            from sharpness.harness.data.catalog import get_spec

            try:
                get_spec(self.dataset)
            except ValueError as err:
                raise ConfigError(f"dataset: {err}") from None
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            changed = [k for k in _IMAGEFOLDER_KEYS if getattr(self, k) != defaults[k]]
            if changed:
                raise ConfigError(f"{', '.join(changed)}: options of dataset: {IMAGEFOLDER}, not of {self.dataset}")
            size = self.upscale_to
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ConfigError(f"upscale_to must be an integer >= 1 or null; got {size!r}")
            return
        if self.upscale_to is not None:
            raise ConfigError(
                f"upscale_to: an option of the in-memory data sets; dataset: {IMAGEFOLDER} crops to image_size"
            )
        # data_dir may be null in a bundled config (the user's folder is not known): the run checks it.
        if self.augment != "none":
            raise ConfigError(
                f"dataset: {IMAGEFOLDER} needs augment: none (its crops and flips happen in the loader); "
                f"got {self.augment!r}"
            )
        unsupported = [
            k for k in ("train_subset", "label_noise", "val_fraction", "bootstrap") if getattr(self, k) not in (None, 0)
        ]
        if unsupported:
            raise ConfigError(f"{', '.join(unsupported)}: not available with dataset: {IMAGEFOLDER}")
        for key in ("image_size", "eval_resize"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1; got {value!r}")
        if self.eval_resize < self.image_size:
            raise ConfigError(
                f"eval_resize ({self.eval_resize}) must be at least image_size ({self.image_size}): evaluation "
                "resizes the shorter side to eval_resize, then takes the central image_size crop"
            )
        if isinstance(self.loader_workers, bool) or not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise ConfigError(f"loader_workers must be an integer >= 0; got {self.loader_workers!r}")

    def _validate_finetune(self) -> None:
        if not _finite(self.backbone_lr_scale) or self.backbone_lr_scale < 0:
            raise ConfigError(f"backbone_lr_scale must be a number >= 0; got {self.backbone_lr_scale!r}")
        if not all(isinstance(p, str) and p for p in self.freeze):
            raise ConfigError(f"freeze must be a list of glob patterns of parameter names; got {self.freeze!r}")

    @property
    def finetunes(self) -> bool:
        """Whether the optimizer gets :func:`sharpness.harness.finetune.param_groups` (head, backbone) rather than
        all parameters in one group."""
        return self.init_from is not None or bool(self.freeze) or self.backbone_lr_scale != 1.0

    @property
    def reports_top5(self) -> bool:
        """``top5``, where null means: for ``dataset: imagefolder`` (the paper's Table 2 gives both errors)."""
        return self.dataset == IMAGEFOLDER if self.top5 is None else self.top5

    def _validate_method_options(self) -> None:
        """The variant's options, checked by building its optimizer on one tensor (one line on a bad value)."""
        if self.method == "sgd":
            return
        import torch

        from sharpness.harness.methods import method_options

        cls, options = method_options(self, total_steps=1)
        try:
            cls(
                [torch.zeros(1, requires_grad=True)], torch.optim.SGD, rho=self.rho, lr=self.lr, momentum=0.9, **options
            )
        except ValueError as err:
            raise ConfigError(f"method {self.method}: {err}") from None

    def _validate_m_sharpness(self) -> None:
        m = self.m_sharpness
        if m is None:
            return
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"m_sharpness must be an integer >= 1 or null; got {m!r}")
        if self.method != "sam":
            raise ConfigError("m_sharpness needs method: sam (it sets the size of SAM's perturbation subsets)")
        if self.batch_size % m:
            raise ConfigError(f"m_sharpness ({m}) must divide batch_size ({self.batch_size})")
        if self.second_order:
            raise ConfigError("m_sharpness does not combine with second_order: true")

    def _validate_distributed(self) -> None:
        """What can be said without knowing the world size (the rest: sharpness.harness.distributed)."""
        if self.m_sharpness is not None and self.perturbation == "global":
            raise ConfigError(
                "m_sharpness needs perturbation: per_replica (global all-reduces the clean pass, so each rank's "
                "subsets would not be perturbed by their own gradient)"
            )
        if self.distributed != "fsdp" or self.method == "sgd":
            return
        if self.perturbation == "per_replica":
            raise ConfigError(
                "distributed: fsdp needs perturbation: global (each rank holds only part of w, so a per-replica "
                "perturbation is not defined)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r}; allowed keys: {', '.join(known)}")
        converted = {key: _coerce(key, value, known[key].type) for key, value in values.items()}
        return cls(**converted)


# One line per key, for ``--help`` and the docs; a test checks that every field has one.
CONFIG_HELP: dict[str, str] = {
    "name": "experiment name, by which reports group runs (a config file's own name when unset)",
    "dataset": "cifar10, cifar100, svhn, svhn_extra (train + extra), mnist, fashion_mnist, digits (embedded), or "
    "imagefolder (data_dir/train/<class>/*.jpg and data_dir/val/, streamed; docs/harness.md)",
    "data_dir": "folder holding the data sets (null: $SHARPNESS_DATA_DIR, else ~/.cache/sharpness/data); for "
    "imagefolder the folder holding train/ and val/ (required)",
    "train_subset": "train on the first N training images only (null: all)",
    "label_noise": "fraction of training labels replaced by another class, chosen from the seed (test stays clean)",
    "noise_kind": "symmetric (a uniformly random other class) or asymmetric (class i -> i + 1)",
    "val_fraction": "fraction of the training set held out for validation (the paper: 0.1 to choose rho)",
    "eval_on": "test, or val: also evaluate the held-out split each epoch (val_* beside test_*)",
    "augment": "none, basic (pad-crop-flip), cutout (basic + Cutout) or autoaugment (policy + basic + Cutout)",
    "autoaugment_policy": "AutoAugment policy: cifar10 or svhn",
    "cutout_size": "side of the Cutout square in pixels",
    "hflip": "mirror images horizontally with probability 1/2 in the crop step (false for digits: SVHN)",
    "upscale_to": "in-memory sets: resize every batch on the device to N x N (bilinear) after augmentation, for a "
    "pretrained model's resolution (Table 3: CIFAR at 600 for EfficientNet-B7) (null: the images' own size)",
    "normalization": "in-memory sets: normalise with the data set's own channel statistics (dataset) or "
    "ImageNet's (imagenet: what an ImageNet-pretrained model expects); imagefolder: always ImageNet's",
    "image_size": "imagefolder: side of the training crop (Inception crop) and of the evaluation's central crop",
    "eval_resize": "imagefolder: evaluation resizes the shorter side to this, then crops the central image_size",
    "decoder": "imagefolder: JPEG decoder, pillow, simplejpeg (pip install 'sharpness[imagefolder]') or dali "
    "(NVIDIA DALI, on the GPU where training runs on CUDA: pip install 'sharpness[dali]')",
    "loader_workers": "imagefolder: decoding processes per rank (0: in the training process)",
    "labels_file": "imagefolder: ground truth of a flat val/ folder (null: LOC_val_solution.csv or val_labels.txt "
    "in val/ or data_dir)",
    "model": "wrn-<depth>-<width>, resnet20/32/44/56/110, resnet18, resnet50/101/152 (ImageNet), "
    "shake-shake-26-2x96d, pyramidnet-<depth>-<alpha>[-shakedrop], mlp, cnn-small, or package.module:factory "
    "(your own, on PYTHONPATH)",
    "model_kwargs": "options of the model family, e.g. {width: 8} for cnn-small, {dropout: 0.3} for wrn-*",
    "init_from": "finetune: start from these weights (a state dict, model.pt, checkpoint.pt or .safetensors), "
    "the classifier re-initialised if its class count differs",
    "head": "finetune: name of the classifier module (null: get_classifier() or the last nn.Linear)",
    "freeze": "finetune: glob patterns of parameter names not to train, e.g. [conv1.*, layer1.*]",
    "freeze_bn_stats": "finetune: BatchNorm layers normalise with their running statistics and never update them",
    "backbone_lr_scale": "finetune: learning rate of all but the classifier, as a multiple of lr",
    "method": "sgd (the base optimizer alone), sam, or a variant: gsam, looksam, msam, esam, fsam, vasso, "
    "interval, stochastic, aesam, random (docs/variants.md)",
    "label": "how reports name this run's method, e.g. looksam-alpha0.2 beside looksam (null: the method's name)",
    "optimizer": "base optimizer: sgd, adam or adamw",
    "epochs": "number of training epochs",
    "train_steps": "number of optimizer steps instead (null: epochs x batches per epoch); the epochs follow",
    "batch_size": "training batch size, over all ranks under torchrun (the last partial batch of an epoch is dropped)",
    "lr": "peak learning rate",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum (sgd)",
    "weight_decay": "weight decay (L2, coupled; decoupled for adamw)",
    "schedule": "learning-rate schedule per step: cosine (to 0), step (x gamma at milestones) or constant",
    "warmup_epochs": "linear warm-up length in epochs (fractions allowed; at most epochs)",
    "milestones": "step schedule: values in (0, 1) are fractions of training, values >= 1 epochs (not mixed)",
    "gamma": "step schedule: factor applied at each milestone",
    "label_smoothing": "label smoothing of the training cross-entropy",
    "grad_clip": "clip the gradient to this global 2-norm (null: no clipping; the paper's code uses 5)",
    "rho": "SAM: radius of the neighbourhood",
    "p": "SAM: the p of the p-norm ball (2, or inf for sign perturbations)",
    "adaptive": "SAM: ASAM's scale-invariant neighbourhood",
    "eta": "SAM: ASAM's eta",
    "ascent_steps": "SAM: inner ascent steps of radius rho / k (paper Appendix C.6)",
    "second_order": "SAM: add the second-order term (paper Appendix C.4; a third pass)",
    "m_sharpness": "SAM: one perturbation per subset of m examples of a batch (paper §4.1; null: whole batch)",
    "gsam_alpha": "gsam: weight of the clean gradient's component orthogonal to the perturbed one (Zhuang et al.)",
    "rho_min": "gsam: radius at the end of the lr schedule; rho follows the lr from rho down to it (null: rho)",
    "looksam_k": "looksam: a SAM step every k steps, one pass reusing its direction in between (Liu et al.)",
    "looksam_alpha": "looksam: weight of the reused direction",
    "esam_beta": "esam: probability that a parameter tensor is perturbed (SWP, Du et al.)",
    "esam_gamma": "esam: fraction of the batch, the sharpest, in the perturbed pass (SDS)",
    "fsam_sigma": "fsam: weight of the gradients' moving average removed from the direction (Li et al. 2024)",
    "fsam_lambda": "fsam: decay of that moving average",
    "vasso_theta": "vasso: weight of the new gradient in the moving-average direction (Li & Giannakis)",
    "interval_k": "interval: a SAM step every k steps, the base optimizer alone in between",
    "sam_probability": "stochastic: probability that a step is a SAM step (Zhao et al. 2022)",
    "aesam_c_start": "aesam: threshold c (in standard deviations of |g|^2) at the first step (Jiang et al.)",
    "aesam_c_end": "aesam: threshold c at the last step (linear in between)",
    "aesam_decay": "aesam: decay of the moving mean and variance of |g|^2",
    "bootstrap": "after training, retrain from scratch on the model's predicted training labels (paper Table 4)",
    "seed": "seed of initialisation, batch order, augmentation, label noise and the validation split",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "precision": "fp32, bf16 (autocast) or fp16 (autocast with GradScaler)",
    "channels_last": "channels-last memory format for convolutions",
    "compile": "torch.compile the model",
    "cudnn_benchmark": "let cuDNN autotune convolutions (CUDA only; batches have a fixed shape)",
    "eval_batch_size": "batch size of evaluation",
    "eval_every": "evaluate every k epochs (and after the last); metrics.jsonl has the other epochs' training figures",
    "top5": "also report the top-5 error (test_top5_error) (null: for dataset imagefolder only)",
    "perturbation": "under torchrun: per_replica (each rank's eps from its own batch, the paper's; m = batch_size / "
    "ranks) or global (eps from the whole batch)",
    "distributed": "under torchrun: ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard; needs perturbation: "
    "global)",
}


def keys_help(width: int = 20) -> str:
    """Every config key with its one-line meaning and default, for ``--help``."""
    lines = ["config keys (set in the YAML file or with --set KEY=VALUE; [default]):"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        lines.append(f"  {f.name:{width}s} {CONFIG_HELP[f.name]} [{_yaml_inline(default)}]")
    return "\n".join(lines)


def _yaml_inline(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Accept YAML's and the command line's spellings of the annotated type; refuse anything else."""
    types = _types(annotation)
    if value is None:
        if type(None) in types:
            return None
        raise ConfigError(f"{key} must not be null")
    if bool in types and isinstance(value, bool):
        return value
    if bool in types and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    if int in types and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
    if float in types and not isinstance(value, bool):
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if str in types and isinstance(value, str):
        return value
    if list in types and isinstance(value, list):
        return [_coerce(key, v, _item_type(annotation)) for v in value]
    if dict in types and isinstance(value, dict):
        return value
    names = " or ".join(sorted(t.__name__ if t is not type(None) else "null" for t in types))
    raise ConfigError(f"{key} must be {names}; got {value!r}")


def _item_type(annotation: Any) -> Any:
    """The element type of a ``list[...]`` annotation (float where unsaid)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"Any": Any})
    for arg in get_args(annotation) or (annotation,):
        if get_origin(arg) is list:
            return (get_args(arg) or (float,))[0]
    return (get_args(annotation) or (float,))[0] if get_origin(annotation) is list else float


def _types(annotation: Any) -> set[type]:
    if isinstance(annotation, str):
        annotation = eval(annotation, {"Any": Any})  # dataclass annotations are strings under __future__
    origin = get_origin(annotation)
    if origin is None:
        return {annotation}
    if origin in (list, dict):
        return {origin}
    return set().union(*(_types(arg) for arg in get_args(annotation)))


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings (values parsed as YAML, e.g. ``rho=0.1``, ``milestones=[0.5,0.75]``)."""
    values = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return TrainConfig.from_dict(values, source="--set")


def bundled_configs() -> dict[str, Path]:
    """The configs shipped with the package, by name (file name without ``.yaml``)."""
    root = resources.files("sharpness.harness") / "configs"
    return {p.stem: Path(str(p)) for p in sorted(Path(str(root)).rglob("*.yaml"), key=lambda p: p.stem)}


def _bundled_config(name: str) -> Path:
    """The bundled config called ``name`` or ``folder/name``; a :class:`ConfigError` with close names if none."""
    bundled = bundled_configs()
    qualified = {f"{p.parent.name}/{stem}": p for stem, p in bundled.items()}
    if name in bundled:
        return bundled[name]
    if name in qualified:
        return qualified[name]
    candidates = list(qualified) if "/" in name else list(bundled)
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"no config file {name!r} and no bundled config of that name "
        f"(`sharpness configs` lists the {len(bundled)} bundled ones){hint}"
    )


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A config from a YAML file, or a bundled config by name, with optional ``key=value`` overrides.

    Files come first: ``name_or_path`` itself, then with ``.yaml`` appended. Otherwise a bundled config is named
    by its file name without ``.yaml`` (``cifar10_wrn16-8_noise40``), optionally after its folder as
    ``sharpness configs`` groups them (``reduced/cifar10_wrn16-8_noise40``); anything longer or ending in
    ``.yaml`` is only ever a file path.
    """
    path = Path(name_or_path)
    if not path.is_file() and Path(f"{path}.yaml").is_file():
        path = Path(f"{path}.yaml")
    if not path.is_file():
        path = _bundled_config(str(name_or_path))
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    values.setdefault("name", path.stem)
    config = TrainConfig.from_dict(values, source=str(path))
    return apply_overrides(config, overrides or [])
