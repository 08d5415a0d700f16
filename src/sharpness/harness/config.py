"""One training run's configuration: a flat dataclass, read from YAML, overridable from the command line."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

__all__ = ["TrainConfig", "ConfigError", "load_config", "bundled_configs", "apply_overrides"]


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line saying what and what is allowed."""


_CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("sgd", "sam"),
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("cosine", "step", "constant"),
    "precision": ("fp32", "bf16", "fp16"),
    "noise_kind": ("symmetric", "asymmetric"),
    "eval_on": ("test", "val"),
}


@dataclass
class TrainConfig:
    """Everything that determines a run. ``method: sgd`` trains with the base optimizer alone."""

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
    # model
    model: str = "cnn-small"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # optimisation
    method: str = "sam"
    optimizer: str = "sgd"
    epochs: int = 10
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
    # label-noise bootstrapping (paper Table 4): retrain on the first model's predicted training labels
    bootstrap: bool = False
    # execution
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    eval_batch_size: int = 1000

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        for key in ("epochs", "batch_size", "ascent_steps", "eval_batch_size", "cutout_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1; got {value!r}")
        if self.train_subset is not None and (not isinstance(self.train_subset, int) or self.train_subset < 1):
            raise ConfigError(f"train_subset must be an integer >= 1 or null; got {self.train_subset!r}")
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
        if self.second_order and (self.precision == "fp16" or self.ascent_steps != 1):
            raise ConfigError(
                "second_order needs ascent_steps: 1 and precision fp32 or bf16 (its closure form does not run "
                "under GradScaler)"
            )
        if self.bootstrap and self.label_noise == 0:
            raise ConfigError("bootstrap: true only makes sense with label_noise > 0")

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
        return [_coerce(key, v, float) for v in value]
    if dict in types and isinstance(value, dict):
        return value
    names = " or ".join(sorted(t.__name__ if t is not type(None) else "null" for t in types))
    raise ConfigError(f"{key} must be {names}; got {value!r}")


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


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A config from a YAML file, or a bundled config by name, with optional ``key=value`` overrides."""
    path = Path(name_or_path)
    if not path.exists():
        bundled = bundled_configs()
        if str(name_or_path) not in bundled:
            raise ConfigError(
                f"no config file {str(name_or_path)!r} and no bundled config of that name; "
                f"bundled: {', '.join(bundled)}"
            )
        path = bundled[str(name_or_path)]
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    values.setdefault("name", path.stem)
    config = TrainConfig.from_dict(values, source=str(path))
    return apply_overrides(config, overrides or [])
