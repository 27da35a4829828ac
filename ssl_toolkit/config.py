"""The experiment configuration: one validated tree, from YAML plus dotted overrides.

Every section forbids unknown keys, every key has a description (the README's key table is
generated from them), and every error names its dotted key (``trainer.epochs``), the bad value
and what is allowed. The ``method`` and ``optim`` sections are validated by the method and
optimizer registries, so plugins registered there are accepted here too. Allowed values come
from the module that owns them (dataset names from the data package, devices from the
distributed helpers, W&B modes from the logger, lr-scaling rules from ``optim``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from models import check_backbone_name
from models.backbones import uses_timm
from optim import ConfigError, OptimizerConfig, parse_optimizer_config
from optim.configs import ConfigModel
from optim.errors import from_validation_error, short_repr
from optim.schedules import LRScaling, WarmupPeak
from ssl_toolkit.accumulation import Accumulation
from ssl_toolkit.data import CropGroup, DatasetName
from ssl_toolkit.data.device_decode import DecodeDevice
from ssl_toolkit.distributed import Device
from ssl_toolkit.knn import BankDtype
from ssl_toolkit.methods import MethodConfig, parse_method_config
from ssl_toolkit.parallel import Strategy
from ssl_toolkit.sync_batch_norm import SyncBNSetting
from ssl_toolkit.wandb_logger import WandbMode
from ssl_toolkit.yaml_loader import describe_yaml_error, load_yaml

__all__ = [
    "CONFIG_DIR",
    "AugmentOverrides",
    "ConfigSection",
    "DataConfig",
    "EvalConfig",
    "ExperimentConfig",
    "LoggingConfig",
    "ModelConfig",
    "ScheduleConfig",
    "TrainerConfig",
    "ValueSchedule",
    "WandbConfig",
    "apply_overrides",
    "load_config",
    "merge_configs",
    "resolve_config_path",
]


def _shipped_configs() -> Path:
    """The YAML configs: the copy installed as ``ssl_toolkit/configs`` package data (see
    ``pyproject.toml``), or in a source checkout the top-level ``configs/``, their source."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


CONFIG_DIR = _shipped_configs()
"""Where bare config names (``simclr_lars``) are looked up."""


class ConfigSection(ConfigModel):
    """A section of the experiment config: unknown keys are errors, values are frozen, numbers
    are finite and never booleans."""


class ModelConfig(ConfigSection):
    """The backbone the method is built on."""

    backbone: str = Field(
        "resnet18",
        description="`resnet18/34/50/101`, `wide_resnet50_2`, any timm model as `timm/<name>`, "
        "or the authors' ViTs: `mocov3_vit_small/base` (MoCo v3's `vits.py`), "
        "`dino_vit_tiny/small/base` (DINO's, its position embedding resized as DINO does)",
    )
    cifar_stem: bool = Field(
        False, description="3x3 stride-1 stem without max-pool, for 32 px images (ResNets)"
    )
    zero_init_residual: bool = Field(
        False,
        description="each residual block's last BatchNorm starts at γ = 0 (torchvision "
        "ResNets; the SimCLR, Barlow Twins, VICReg and MoCo v3 code)",
    )

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        return check_backbone_name(name)

    sync_bn: SyncBNSetting = Field(
        "auto",
        description="batch-norm statistics over all processes' batches (every BatchNorm of "
        "the method); `auto`: when more than one process trains",
    )
    sync_bn_group_size: int | None = Field(
        None,
        ge=1,
        description="synchronise batch norm within groups of this many consecutive ranks "
        "(SwAV's apex SyncBN: 8); null: all processes",
    )
    stop_grad_conv1: bool = Field(
        False,
        description="a ViT's patch projection stays at its random init (MoCo v3's "
        "--stop-grad-conv1)",
    )
    drop_path_rate: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="stochastic depth of a timm backbone (DINO's ViTs: 0.1); null: timm's default",
    )
    dynamic_img_size: bool = Field(
        False,
        description="a timm ViT takes crops of any size, its position embedding interpolated "
        "(multi-crop's local crops)",
    )

    @model_validator(mode="after")
    def _timm_only(self) -> ModelConfig:
        for key in ("drop_path_rate", "dynamic_img_size"):
            if getattr(self, key) and not uses_timm(self.backbone):
                raise ValueError(f"{key} is a timm backbone option; {self.backbone} has none")
        return self

    def backbone_options(self) -> dict[str, Any]:
        """The keyword arguments of ``build_method`` that describe the backbone."""
        options: dict[str, Any] = {
            "backbone": self.backbone,
            "cifar_stem": self.cifar_stem,
            "zero_init_residual": self.zero_init_residual,
        }
        if self.drop_path_rate is not None:
            options["drop_path_rate"] = self.drop_path_rate
        if self.dynamic_img_size:
            options["dynamic_img_size"] = True
        if self.stop_grad_conv1:
            options["stop_grad_conv1"] = True
        return options


def _probability(description: str) -> Any:
    return Field(None, ge=0.0, le=1.0, description=description)


class AugmentOverrides(ConfigSection):
    """Changes to the method's own two-view augmentation, in both views (null: keep)."""

    flip_p: float | None = _probability("horizontal flip probability")
    jitter_p: float | None = _probability("colour jitter probability")
    gray_p: float | None = _probability("grayscale probability")
    blur_p: float | None = _probability("Gaussian blur probability")
    solarize_p: float | None = _probability("solarisation probability")
    rotation: float | None = Field(
        None, ge=0.0, le=180.0, description="rotate each crop by up to this many degrees"
    )


class DataConfig(ConfigSection):
    """The pretraining data, its augmentation and batch size (per process)."""

    name: DatasetName = Field("digits", description="the dataset")
    root: str | None = Field(None, description="where the dataset's files are")
    index_dir: str | None = Field(
        None,
        description="where the indexes of image folders and shards are kept (null: the "
        "per-user cache, `$XDG_CACHE_HOME/ssl-toolkit` or `~/.cache/ssl-toolkit`)",
    )
    download: bool = Field(False, description="let torchvision fetch the files into `root`")
    batch_size: int = Field(256, ge=2, description="images per process and micro-batch")
    image_size: int = Field(32, ge=8, description="side of the augmented views, in pixels")
    num_workers: int = Field(
        2, ge=0, description="decoding workers (image folders and shards only)"
    )
    skip_bad: bool = Field(
        False,
        description="image folders and shards: put the next image in the place of one that "
        "does not decode, and list it, instead of stopping",
    )
    allow_changed: bool = Field(
        False,
        description="a resume on data other than the checkpoint's (images or shards added "
        "or removed) goes on, with a warning: the interrupted epoch continues from the same "
        "point in the order drawn for it over the data as it is now; false: an error",
    )
    num_classes: int | None = Field(
        None,
        gt=0,
        description="shards whose index names no classes: their labels are 0..num_classes-1 "
        "(some may not occur); null: one class per distinct label, which must be 0..K-1",
    )
    decode: DecodeDevice = Field(
        "cpu",
        description="where pretraining images of folders and shards are decoded and cropped: "
        "in the CPU workers, or batched on the GPU (`cuda`, nvjpeg) from the bytes the "
        "workers read",
    )
    color_strength: float = Field(
        1.0, ge=0.0, description="colour-jitter strength s (SimCLR's augmentation)"
    )
    crop_min_scale: float = Field(
        0.08,
        gt=0.0,
        le=1.0,
        description="smallest area fraction of the random resized crop (with `crops`, each "
        "group's `scale` instead)",
    )
    augment: AugmentOverrides = Field(
        AugmentOverrides(), description="changes to the method's augmentation"
    )
    crops: list[CropGroup] | None = Field(
        None,
        description="multi-crop: groups of `{count, size, scale: [low, high], blur_p, "
        "solarize_p}`, global crops first; crop v takes the method's view v (its local-crop "
        "policy beyond) with its group's size, scale and probabilities; null: the method's "
        "two views of `image_size` and `crop_min_scale`",
    )

    @model_validator(mode="after")
    def _some_crops(self) -> DataConfig:
        if self.crops is not None and not self.crops:
            raise ValueError("crops: an empty list; null keeps the method's two views")
        return self

    @model_validator(mode="after")
    def _classes_of_shards(self) -> DataConfig:
        if self.num_classes is not None and self.name != "shards":
            raise ValueError(
                f"num_classes: declares the classes of shards; {self.name!r} has its own"
            )
        return self

    @model_validator(mode="after")
    def _decodable(self) -> DataConfig:
        if self.decode == "cpu":
            return self
        if self.name not in ("imagefolder", "shards"):
            raise ValueError(
                f"decode: {self.decode!r} decodes image folders and shards; {self.name!r} "
                "is held in memory, decoded already (use decode: cpu)"
            )
        if self.skip_bad:
            raise ValueError(
                "decode: an image that does not decode on the GPU stops the run; skip_bad "
                "needs decode: cpu"
            )
        return self

    def views(self) -> list[CropGroup]:
        """The crops of every image: ``crops``, or two of ``image_size`` and
        ``crop_min_scale``."""
        if self.crops is not None:
            return list(self.crops)
        return [CropGroup(count=2, size=self.image_size, scale=(self.crop_min_scale, 1.0))]


class ValueSchedule(ConfigSection):
    """An optimizer hyperparameter per step: a linear warmup from 0, then a half cosine from
    the optimizer's own value (``optim.<key>``) to ``end``, as the lr runs."""

    end: float = Field(ge=0.0, description="the value at the last step")
    warmup_epochs: float = Field(
        0.0, ge=0.0, description="linear warmup from 0 to the optimizer's value, per step"
    )


# The optimizer keys a `schedule:` entry may drive, besides the lr.
SCHEDULED_KEYS = ("weight_decay", "momentum")


class ScheduleConfig(ConfigSection):
    """Learning rate: batch-size scaling of ``optim.lr``, linear warmup, cosine decay; and the
    other hyperparameters that follow a schedule (the optimizer's value is their start).
    The scales the parameter rules give each param group multiply every scheduled value."""

    lr_scaling: LRScaling = Field(
        "linear",
        description="peak lr = `optim.lr` x global batch / 256 (`linear`), x sqrt(global "
        "batch) (`sqrt`), or as is (`none`)",
    )
    warmup_epochs: float = Field(10.0, ge=0.0, description="linear warmup, per step")
    warmup_from: float | None = Field(
        None,
        ge=0.0,
        description="the lr of the first step: step s (from 0) of the W warmup steps gets "
        "`warmup_from + (peak - warmup_from)·s/(W - 1)`, `numpy.linspace(warmup_from, peak, "
        "W)[s]`, the peak at the last warmup step (SwAV, DINO, solo-learn's `warmup_start_lr`); "
        "null: a warmup from 0, as `warmup_peak_at` says",
    )
    warmup_peak_at: WarmupPeak = Field(
        "last_warmup_step",
        description="with `warmup_from` null, where the warmup reaches the peak: "
        "`last_warmup_step`: step s (from 0) of W gets `peak·(s + 1)/W`; `first_cosine_step`: "
        "`peak·s/W`, 0 at the first step and the peak at step W, the cosine's first, as the "
        "SimCLR, BYOL, Barlow Twins, VICReg and MoCo v3 code; the cosine is the same",
    )
    final_lr: float = Field(0.0, ge=0.0, description="lr at the end of the cosine decay")
    weight_decay: ValueSchedule | None = Field(
        None,
        description="`optim.weight_decay` on a cosine to `end` (DINO: 0.04 to 0.4); null: "
        "constant; logged as `train/weight_decay`",
    )
    momentum: ValueSchedule | None = Field(
        None,
        description="`optim.momentum` on a cosine to `end`; null: constant; logged as "
        "`train/momentum`",
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> ScheduleConfig:
        if self.warmup_from is not None and self.warmup_peak_at != "last_warmup_step":
            raise ValueError(
                "warmup_peak_at: first_cosine_step places a warmup from 0; warmup_from's "
                "reaches the peak at the last warmup step (set one of them)"
            )
        return self

    def scheduled(self) -> dict[str, ValueSchedule]:
        """The optimizer keys with a schedule, and their schedules."""
        return {key: getattr(self, key) for key in SCHEDULED_KEYS if getattr(self, key)}


class TrainerConfig(ConfigSection):
    """How long, where, in which precision, and how often to save and log."""

    epochs: int = Field(100, ge=1, description="length of the run, unless `max_steps` is sooner")
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many optimizer steps, if sooner"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="`fp32`, `bf16` (autocast) or `fp16` (autocast + GradScaler)"
    )
    device: Device = Field("auto", description="`auto` is CUDA when available, else the CPU")
    strategy: Strategy = Field(
        "ddp",
        description="with several processes: `ddp` replicates the model, `fsdp2` shards "
        "parameters, gradients and optimizer state (per ResNet stage or ViT block)",
    )
    collective_timeout_minutes: float = Field(
        30.0, gt=0.0, description="how long a process waits in a collective before failing"
    )
    output_dir: str = Field("runs/default", description="the run directory")

    @field_validator("output_dir")
    @classmethod
    def _named_directory(cls, output_dir: str) -> str:
        """An empty name would be the working directory, whose files a run replaces."""
        if not output_dir.strip():
            raise ValueError(
                "empty, which is the working directory, whose files a run replaces; "
                "name a run directory"
            )
        return output_dir

    seed: int = Field(0, description="seeds weights, data order and augmentation")
    channels_last: bool = Field(
        True, description="channels-last memory format (images only under `fsdp2`)"
    )
    compile: bool = Field(
        False, description="`torch.compile` the method's embedding pass (forward and backward)"
    )
    accumulate_grad_batches: int = Field(1, ge=1, description="micro-batches per optimizer step")
    accumulation: Accumulation = Field(
        "exact",
        description="`exact`: the loss of all micro-batches of a step joined (cached embedding "
        "gradients, one more forward pass), the batch the lr is scaled for; `independent`: "
        "the mean of each micro-batch's own loss",
    )
    checkpoint_every_steps: int = Field(
        500, ge=1, description="steps between checkpoints (also at every epoch end)"
    )
    log_every_steps: int = Field(10, ge=1, description="steps between loss / lr log rows")
    keep_checkpoints: int = Field(
        2, ge=1, description="step checkpoints kept (besides `last.pt` and `best.pt`)"
    )
    max_skipped_steps: int = Field(
        20, ge=1, description="fp16: stop after this many overflow-skipped steps in a row"
    )
    deterministic: bool = Field(
        False,
        description="deterministic algorithms where torch has them "
        "(`torch.use_deterministic_algorithms(warn_only=True)`, cuDNN without benchmarking): "
        "slower; the CUDA kernels with no deterministic version warn",
    )

    @model_validator(mode="after")
    def _supported(self) -> TrainerConfig:
        if self.precision == "fp16" and self.strategy == "fsdp2":
            raise ValueError(
                "precision fp16 needs a GradScaler, which fsdp2 does not support here; "
                "use bf16 (no scaler) or strategy ddp"
            )
        return self


class WandbConfig(ConfigSection):
    """Weights & Biases: offline by default (``wandb sync`` uploads later)."""

    mode: WandbMode = Field(
        "offline", description="`offline` writes the run locally; `wandb sync DIR` uploads it"
    )
    project: str = Field("ssl-toolkit", description="W&B project")
    entity: str | None = Field(None, description="W&B entity (user or team)")
    name: str | None = Field(None, description="W&B run name")
    tags: list[str] = Field(default_factory=list, description="W&B run tags (strings)")


class LoggingConfig(ConfigSection):
    """Logging: W&B, and how often trust ratios are sent."""

    wandb: WandbConfig = Field(WandbConfig(), description="Weights & Biases")
    trust_ratio_every: int = Field(
        50, ge=1, description="steps between trust-ratio logs (also the first step)"
    )


class EvalConfig(ConfigSection):
    """The kNN monitor on frozen backbone features, and the probes at the end of a run."""

    every_epochs: int = Field(5, ge=1, description="epochs between kNN evaluations (and the end)")
    root: str | None = Field(
        None,
        description="a labelled image folder to evaluate on instead of `data` (needed when "
        "`data.root` has no labels)",
    )
    knn_k: int = Field(20, ge=1, description="neighbours that vote")
    knn_temperature: float = Field(0.1, gt=0.0, description="temperature of the vote weights")
    batch_size: int = Field(512, ge=1, description="images per batch when encoding")
    bank_dtype: BankDtype = Field(
        "fp32",
        description="precision of the kNN bank's features; fp16 halves the bank's memory",
    )
    knn_bank_size: int | None = Field(
        None,
        ge=1,
        description="cap the evaluation bank at this many images, a fixed random subset "
        "(as DINO's and solo-learn's monitors do, for speed); null keeps every image",
    )
    labels_per_class: int = Field(
        10, ge=1, description="labels per class of the few-label linear probe at the end"
    )
    baseline: bool = Field(
        True,
        description="probe a randomly initialised encoder of the same config too "
        "(`summary.json`'s `baseline`)",
    )


class ExperimentConfig(ConfigSection):
    """A whole pretraining run."""

    method: SerializeAsAny[MethodConfig] = Field(
        default_factory=lambda: parse_method_config({"name": "simclr"}),
        description="the SSL method, by `name`, and its keys",
    )
    model: ModelConfig = Field(ModelConfig(), description="the backbone")
    data: DataConfig = Field(DataConfig(), description="data and augmentation")
    optim: SerializeAsAny[OptimizerConfig] = Field(
        description="the optimizer, by `name`, and its keys"
    )
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="the lr schedule")
    trainer: TrainerConfig = Field(TrainerConfig(), description="the training loop")
    logging: LoggingConfig = Field(LoggingConfig(), description="logging")
    eval: EvalConfig = Field(EvalConfig(), description="the kNN monitor")

    @field_validator("method", mode="before")
    @classmethod
    def _registered_method(cls, value: Any) -> MethodConfig:
        return parse_method_config(value, prefix="method")

    @field_validator("optim", mode="before")
    @classmethod
    def _registered_optimizer(cls, value: Any) -> OptimizerConfig:
        return parse_optimizer_config(value, prefix="optim")

    @model_validator(mode="after")
    def _run_beside_the_data(self) -> ExperimentConfig:
        """The run directory is never the data folder itself: its pictures and checkpoints
        would sit among the images (a run directory inside it is left out of the listing)."""
        root = self.data.root
        if root is not None and os.path.realpath(self.trainer.output_dir) == os.path.realpath(root):
            raise ConfigError(
                [
                    f"trainer.output_dir: {self.trainer.output_dir!r} is data.root, whose "
                    "images the run's files would join; name a run directory outside it"
                ]
            )
        return self

    @model_validator(mode="after")
    def _schedulable(self) -> ExperimentConfig:
        """Every scheduled key is one of the optimizer's, and every value the schedule takes
        is one the optimizer accepts for it."""
        optim_cls = type(self.optim)
        for key, schedule in self.schedule.scheduled().items():
            where = f"schedule.{key}"
            if key not in optim_cls.model_fields:
                raise ConfigError([f"{where}: optimizer {self.optim.name!r} has no {key}"])
            try:
                optim_cls.model_validate(self.optim.model_dump() | {key: schedule.end})
            except ValidationError as err:
                reason = err.errors()[0]["msg"]
                raise ConfigError(
                    [f"{where}.end: {schedule.end!r} is no valid optim.{key} ({reason})"]
                ) from None
        if self.schedule.weight_decay and self.optim.weight_decay == 0:
            for index, rule in enumerate(self.optim.param_groups):
                if rule.weight_decay:
                    raise ConfigError(
                        [
                            f"schedule.weight_decay: optim.param_groups[{index}].weight_decay "
                            f"({rule.weight_decay!r}) is no multiple of optim.weight_decay (0), "
                            "which the schedule scales"
                        ]
                    )
        return self

    @classmethod
    def from_dict(cls, data: Any) -> ExperimentConfig:
        """Validate a plain mapping; raises ConfigError with one line per problem."""
        if not isinstance(data, dict):
            raise ConfigError(
                [f"config: expected a mapping at the top level, got {short_repr(data)}"]
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise from_validation_error(err, cls, prefix="") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML-safe), every default filled in."""
        return self.model_dump(mode="json")


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the OS refuses (too long, say) instead of raising."""
    try:
        return path.is_file()
    except OSError:
        return False


def _find_config(name: str, *directories: Path) -> Path | None:
    """``name`` or ``name.yaml`` in the first of ``directories`` that has it."""
    for directory in directories:
        for candidate in (directory / name, directory / f"{name}.yaml"):
            if _is_file(candidate):
                return candidate
    return None


def resolve_config_path(name_or_path: str) -> Path:
    """A path as given, or a bare name looked up in ``configs/`` (``.yaml`` optional)."""
    path = Path(name_or_path)
    found = path if _is_file(path) else _find_config(name_or_path, CONFIG_DIR)
    if found is not None:
        return found
    known = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))
    raise ConfigError(
        [
            f"--config: no file {short_repr(name_or_path)} here or in configs/; "
            f"known: {', '.join(known)}"
        ]
    )


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            raise ConfigError([f"{key}: {prefix} is a value ({short_repr(child)}), not a section"])
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
            value = load_yaml(_quote_selectors(raw)) if raw.strip() else None
        except yaml.YAMLError as err:
            reason = describe_yaml_error(err)
            problems.append(f"{key}: cannot parse {short_repr(raw)} as YAML: {reason}")
            continue
        try:
            _set_dotted(data, key, value)
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return data


def _read_yaml(path: Path) -> dict[str, Any]:
    """One YAML file as a mapping (``load_yaml``); an error is one line naming file and line."""
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}:{where} invalid YAML: {describe_yaml_error(err)}"]) from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError([f"{path}: cannot read ({reason})"]) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level"])
    return data


# Top-level sections whose ``name`` picks a registered config class: another name there
# means another set of keys, so the base's section does not carry over.
_REGISTERED_SECTIONS = frozenset({"method", "optim"})


def merge_configs(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``, key by key: mappings merge, anything else the child replaces.

    A ``method`` or ``optim`` section that names another registered component than its base
    replaces the base's section whole, since the base's keys belong to another config class.
    Every other mapping merges, whatever its ``name`` (``data.name``, ``logging.wandb.name``).
    """
    merged = _merge_mappings(base, child)
    for key in _REGISTERED_SECTIONS & child.keys():
        inherited, value = base.get(key), child[key]
        if (
            isinstance(inherited, dict)
            and isinstance(value, dict)
            and value.get("name", inherited.get("name")) != inherited.get("name")
        ):
            merged[key] = value
    return merged


def _merge_mappings(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """A deep merge: nested mappings merge, anything else the child replaces."""
    merged = dict(base)
    for key, value in child.items():
        inherited = merged.get(key)
        both_mappings = isinstance(value, dict) and isinstance(inherited, dict)
        merged[key] = _merge_mappings(inherited, value) if both_mappings else value
    return merged


def _with_bases(path: Path) -> dict[str, Any]:
    """The YAML at ``path`` merged over its ``base:`` chain: a base is looked up beside its
    child, then in ``configs/`` (``.yaml`` optional), never in the working directory. The chain
    is walked in a loop, not by recursion, so that no depth ends in a ``RecursionError``."""
    chain = [(path, _read_yaml(path))]
    seen = {path.resolve()}
    while "base" in (data := chain[-1][1]):
        child = chain[-1][0]
        base = data.pop("base")
        if not isinstance(base, str) or not base:
            problem = f"base: expected a config name or path, got {short_repr(base)}"
            raise ConfigError([f"{child}: {problem}"])
        base_path = _find_config(base, child.parent, CONFIG_DIR)
        if base_path is None:
            problem = f"base: no config {short_repr(base)} beside it or in configs/"
            raise ConfigError([f"{child}: {problem}"])
        if base_path.resolve() in seen:
            cycle = " -> ".join(str(p) for p in (*(p for p, _ in chain), base_path))
            raise ConfigError([f"{child}: base: a cycle of bases ({cycle})"])
        seen.add(base_path.resolve())
        chain.append((base_path, _read_yaml(base_path)))
    merged = chain[-1][1]
    for _, data in reversed(chain[:-1]):
        merged = merge_configs(merged, data)
    return merged


def load_config(name_or_path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML config and its ``base:`` chain, apply dotted overrides, and validate."""
    data = _with_bases(resolve_config_path(name_or_path))
    return ExperimentConfig.from_dict(apply_overrides(data, overrides or []))
