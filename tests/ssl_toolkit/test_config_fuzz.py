"""Random YAML and random overrides: each gives a valid config or one clean ConfigError."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optim import ConfigError
from ssl_toolkit.config import ExperimentConfig, load_config

# Real keys and values mixed with noise, so that examples reach deep into validation.
KEYS = st.sampled_from(
    [
        "method",
        "name",
        "simclr",
        "byol",
        "barlow_twins",
        "temperature",
        "projector",
        "hidden_dim",
        "model",
        "backbone",
        "data",
        "batch_size",
        "augment",
        "rotation",
        "optim",
        "lars",
        "lr",
        "param_groups",
        "match",
        "lr_scale",
        "exclude_from_weight_decay",
        "trainer",
        "epochs",
        "max_steps",
        "precision",
        "strategy",
        "eval",
        "root",
        "base",
        "logging",
        "wandb",
        "mode",
        "tags",
        "schedule",
        "lr_scaling",
    ]
) | st.text(max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["lars", "simclr", "byol", "resnet18", "@norm", "fp16", "fsdp2", "auto"])
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=25,
)
OVERRIDE_KEYS = st.lists(KEYS, min_size=0, max_size=4).map(".".join)
OVERRIDES = st.lists(
    st.builds(lambda k, v: f"{k}={v}", OVERRIDE_KEYS, st.text(max_size=16)) | st.text(max_size=20),
    max_size=4,
)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _parses_or_fails_cleanly(path: Path, overrides: list[str]) -> None:
    try:
        cfg = load_config(str(path), overrides)
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)
        assert "Traceback" not in str(err)
    else:
        assert isinstance(cfg, ExperimentConfig)


@SETTINGS
@given(document=DOCUMENTS, overrides=OVERRIDES)
def test_random_yaml_documents(tmp_path: Path, document: object, overrides: list[str]) -> None:
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    _parses_or_fails_cleanly(path, overrides)


@SETTINGS
@given(text=st.text(max_size=200))
def test_random_yaml_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "random.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _parses_or_fails_cleanly(path, [])


@SETTINGS
@given(overrides=OVERRIDES)
def test_random_overrides_on_a_shipped_config(overrides: list[str]) -> None:
    try:
        load_config("simclr_lars", overrides)
    except ConfigError as err:
        assert err.problems
