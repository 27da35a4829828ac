"""The experiment configuration: one validated tree, from YAML plus dotted overrides.

Every section forbids unknown keys, and every error names its dotted key (``trainer.epochs``),
the bad value and what is allowed. The ``optim`` section is validated by the optimizer registry,
so plugins registered there are accepted here too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from optim import ConfigError, OptimizerConfig, parse_optimizer_config
from optim.errors import from_validation_error

__all__ = [
    "CONFIG_DIR",
    "BYOLConfig",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "HeadConfig",
    "LoggingConfig",
    "ModelConfig",
    "ScheduleConfig",
    "SimCLRConfig",
    "TrainerConfig",
    "WandbConfig",
    "apply_overrides",
    "load_config",
    "resolve_config_path",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
"""Where bare config names (``simclr_lars``) are looked up."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeadConfig(_Section):
    """An MLP head: hidden width, output width, number of linear layers."""

    hidden_dim: int = Field(2048, ge=1)
    out_dim: int = Field(128, ge=1)
    num_layers: int = Field(2, ge=1)


class SimCLRConfig(_Section):
    """SimCLR: NT-Xent over two views of a backbone + projector."""

    name: Literal["simclr"] = "simclr"
    temperature: float = Field(0.2, gt=0.0)
    projector: HeadConfig = HeadConfig(hidden_dim=2048, out_dim=128, num_layers=2)


class BYOLConfig(_Section):
    """BYOL: online network + predictor against an EMA target network."""

    name: Literal["byol"] = "byol"
    projector: HeadConfig = HeadConfig(hidden_dim=4096, out_dim=256, num_layers=2)
    predictor: HeadConfig = HeadConfig(hidden_dim=4096, out_dim=256, num_layers=2)
    tau_base: float = Field(0.996, ge=0.0, le=1.0)
    tau_final: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _tau_rises(self) -> BYOLConfig:
        if self.tau_final < self.tau_base:
            raise ValueError("tau_final must be >= tau_base")
        return self


class ModelConfig(_Section):
    """The backbone; ``cifar_stem`` swaps the ImageNet stem for a 3x3 stride-1 conv."""

    backbone: str = "resnet18"
    cifar_stem: bool = False


DatasetName = Literal["digits", "synthetic", "cifar10", "cifar100", "stl10", "imagefolder"]


class DataConfig(_Section):
    """The pretraining data, its augmentation and batch size (per process)."""

    name: DatasetName = "digits"
    root: str | None = None
    download: bool = False
    batch_size: int = Field(256, ge=2)
    image_size: int = Field(32, ge=8, description="size of the augmented views")
    num_workers: int = Field(2, ge=0, description="decoding workers, image folders only")
    color_strength: float = Field(1.0, ge=0.0, description="colour jitter strength (SimCLR)")
    crop_min_scale: float = Field(0.08, gt=0.0, le=1.0, description="smallest crop area fraction")


class ScheduleConfig(_Section):
    """Learning rate: batch-size scaling of ``optim.lr``, linear warmup, cosine decay."""

    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    warmup_epochs: float = Field(10.0, ge=0.0)
    final_lr: float = Field(0.0, ge=0.0)


class TrainerConfig(_Section):
    """How long, where, in which precision, and how often to save."""

    epochs: int = Field(100, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "runs/default"
    seed: int = 0
    channels_last: bool = True
    compile: bool = False
    accumulate_grad_batches: int = Field(1, ge=1)
    checkpoint_every_steps: int = Field(500, ge=1)
    log_every_steps: int = Field(10, ge=1)


class WandbConfig(_Section):
    """Weights & Biases: offline by default (``wandb sync`` uploads later)."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "ssl-toolkit"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(_Section):
    """Logging: W&B, and how often trust ratios are sent."""

    wandb: WandbConfig = WandbConfig()
    trust_ratio_every: int = Field(50, ge=1)


class EvalConfig(_Section):
    """The kNN monitor on frozen backbone features."""

    every_epochs: int = Field(5, ge=1)
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.1, gt=0.0)
    batch_size: int = Field(512, ge=1)


MethodConfig = Annotated[Union[SimCLRConfig, BYOLConfig], Field(discriminator="name")]  # noqa: UP007


class ExperimentConfig(_Section):
    """A whole pretraining run."""

    method: MethodConfig = SimCLRConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: SerializeAsAny[OptimizerConfig]
    schedule: ScheduleConfig = ScheduleConfig()
    trainer: TrainerConfig = TrainerConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("optim", mode="before")
    @classmethod
    def _registered_optimizer(cls, value: Any) -> OptimizerConfig:
        return parse_optimizer_config(value, prefix="optim")

    @classmethod
    def from_dict(cls, data: Any) -> ExperimentConfig:
        """Validate a plain mapping; raises ConfigError with one line per problem."""
        if not isinstance(data, dict):
            raise ConfigError([f"config: expected a mapping at the top level, got {data!r}"])
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise from_validation_error(err, cls, prefix="") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML-safe), every default filled in."""
        return self.model_dump(mode="json")


def resolve_config_path(name_or_path: str) -> Path:
    """A path as given, or a bare name looked up in ``configs/`` (``.yaml`` optional)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))
    raise ConfigError(
        [f"--config: no file {name_or_path!r} here or in configs/; known: {', '.join(known)}"]
    )


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError([f"{key}: {prefix} is a value ({child!r}), not a section"])
        node = child
    node[parts[-1]] = value


# YAML reserves '@', so the rule selectors of `[@norm, @bias]` are quoted before parsing.
_BARE_SELECTOR = re.compile(r"(^|[\[,{:]\s*)(@[\w.*-]+)")


def _quote_selectors(raw: str) -> str:
    return _BARE_SELECTOR.sub(r'\1"\2"', raw.strip())


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides; values are parsed as YAML (``[@norm, @bias]``)."""
    problems = []
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"{override}: an override must look like dotted.key=value")
            continue
        try:
            value = yaml.safe_load(_quote_selectors(raw)) if raw.strip() else None
        except yaml.YAMLError as err:
            problems.append(f"{key}: cannot parse {raw!r} as YAML ({err.problem})")
            continue
        try:
            _set_dotted(data, key, value)
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return data


def load_config(name_or_path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config (``yaml.safe_load``), apply overrides and validate."""
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}:{where} invalid YAML: {err}"]) from None
    except OSError as err:
        raise ConfigError([f"{path}: cannot read ({err.strerror})"]) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level"])
    return ExperimentConfig.from_dict(apply_overrides(data, overrides or []))
