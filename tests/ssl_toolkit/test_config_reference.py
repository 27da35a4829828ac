"""The README's key tables come from the schema, and every key has one source and a description."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

from optim import ParamGroupRule
from optim.registry import OPTIMIZERS
from optim.schedules import LRScaling
from ssl_toolkit import config as config_module
from ssl_toolkit.config import (
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    TrainerConfig,
    WandbConfig,
)
from ssl_toolkit.config_reference import TABLES, update_readme
from ssl_toolkit.data import DATASET_NAMES
from ssl_toolkit.data.device_decode import DECODE_DEVICES
from ssl_toolkit.distributed import DEVICES
from ssl_toolkit.knn import BANK_DTYPES
from ssl_toolkit.methods import METHODS, HeadConfig
from ssl_toolkit.wandb_logger import WANDB_MODES

README = Path(__file__).resolve().parents[2] / "README.md"


def _models() -> list[type[BaseModel]]:
    """Every config model a user writes keys of: sections, methods, optimizers, heads, rules."""
    found: list[type[BaseModel]] = [ExperimentConfig, HeadConfig, ParamGroupRule]
    for section in ExperimentConfig.model_fields.values():
        annotation = section.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.append(annotation)
    found.append(WandbConfig)
    found += [METHODS.entry(name).config_cls for name in METHODS.names()]
    found += [OPTIMIZERS.entry(name).config_cls for name in OPTIMIZERS.names()]
    return found


def test_readme_tables_are_generated_from_the_schema() -> None:
    text = README.read_text()
    assert update_readme(text) == text, "README config tables are stale: run `make docs`"
    for render in TABLES.values():
        assert render() in text


def test_a_stale_table_is_detected() -> None:
    text = README.read_text()
    stale = text.replace("| `eval.knn_k` |", "| `eval.knn_kk` |")
    assert stale != text and update_readme(stale) == text
    with pytest.raises(ValueError, match="no region"):
        update_readme("a README without tables")


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_config_field_has_a_description(model: type[BaseModel]) -> None:
    assert not [name for name, field in model.model_fields.items() if not field.description]


def test_allowed_values_come_from_the_module_that_owns_them() -> None:
    # The config defines no set of its own but the precision, which only the trainer reads.
    source = Path(config_module.__file__).read_text()
    assert re.findall(r"Literal\[([^\]]*)\]", source) == ['"fp32", "bf16", "fp16"']
    assert get_args(DataConfig.model_fields["name"].annotation) == DATASET_NAMES
    assert get_args(TrainerConfig.model_fields["device"].annotation) == DEVICES
    assert get_args(WandbConfig.model_fields["mode"].annotation) == WANDB_MODES
    assert set(get_args(EvalConfig.model_fields["bank_dtype"].annotation)) == set(BANK_DTYPES)
    assert get_args(DataConfig.model_fields["decode"].annotation) == DECODE_DEVICES
    assert get_args(
        ExperimentConfig.model_fields["schedule"].annotation.model_fields["lr_scaling"].annotation
    ) == get_args(LRScaling)
    table = TABLES["experiment-keys"]()
    assert ", ".join(f"`{n}`" for n in DATASET_NAMES) in table
    assert "| `trainer.device` | `auto` | `auto`, `cpu`, `cuda` |" in table
