"""The method registry: lookup, registration, entry points, config validation."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest

from optim import ConfigError
from ssl_toolkit import trainer as trainer_module
from ssl_toolkit.config import ExperimentConfig, load_config
from ssl_toolkit.methods import (
    BYOL,
    METHODS,
    BarlowTwins,
    MethodConfig,
    MoCoV3,
    SimCLR,
    SimCLRConfig,
    VICReg,
    get_method,
    list_methods,
    register_method,
)


def test_builtins_are_listed_and_found() -> None:
    assert list_methods() == [
        "barlow_twins",
        "byol",
        "dino",
        "mocov3",
        "simclr",
        "swav",
        "vicreg",
    ]
    assert get_method("simclr") is SimCLR
    assert get_method("vicreg") is VICReg
    assert get_method("mocov3") is MoCoV3
    assert get_method("byol") is BYOL
    assert get_method("barlow_twins") is BarlowTwins
    with pytest.raises(ConfigError, match=r"method\.name: unknown method 'simclrr'; did you mean"):
        get_method("simclrr")


def test_registering_a_taken_name_or_a_wrong_class_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))

    class OtherConfig(MethodConfig):
        name: Literal["other"] = "other"

    with pytest.raises(ValueError, match="method 'simclr' is already registered"):
        register_method("simclr", SimCLRConfig)(SimCLR)
    with pytest.raises(ValueError, match="must default to 'another'"):
        register_method("another", OtherConfig)(SimCLR)
    with pytest.raises(TypeError, match=r"must subclass ssl_toolkit\.methods\.Method"):
        register_method("other", OtherConfig)(object)
    with pytest.raises(TypeError, match="must subclass MethodConfig"):
        register_method("other", dict)(SimCLR)


def test_method_section_is_validated_by_the_registered_config() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("barlow_lars", ["method.off_diagonal_wieght=0.1", "method.projector.out=3"])
    assert sorted(info.value.problems) == [
        "method.off_diagonal_wieght: unknown key; did you mean 'off_diagonal_weight'? "
        "allowed keys: name, loss_scale, gradient_scale, projector, off_diagonal_weight",
        "method.projector.out: unknown key; did you mean 'out_dim'? "
        "allowed keys: hidden_dim, out_dim, num_layers, last_batch_norm",
    ]
    with pytest.raises(ConfigError, match=r"method\.name: required; one of barlow_twins, byol"):
        load_config("simclr_lars", ["method={temperature: 0.1}"])
    default = ExperimentConfig.from_dict({"optim": {"name": "lars", "lr": 1}}).method
    assert isinstance(default, SimCLRConfig)


def test_method_from_a_real_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package installed with an ``ssl_toolkit.methods`` entry point is found lazily."""
    (tmp_path / "extra_method.py").write_text(
        textwrap.dedent(
            """
            from typing import Literal
            from ssl_toolkit.methods import MethodConfig, SimCLR, register_method

            class PluginConfig(MethodConfig):
                name: Literal["plugin"] = "plugin"
                temperature: float = 0.3

            @register_method("plugin", PluginConfig)
            class Plugin(SimCLR):
                pass
            """
        )
    )
    dist_info = tmp_path / "extra_method-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: extra-method\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[ssl_toolkit.methods]\nplugin = extra_method\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))
    monkeypatch.setattr(METHODS, "_entry_points_loaded", False)
    monkeypatch.delitem(sys.modules, "extra_method", raising=False)
    assert "plugin" in list_methods()
    cfg = load_config("simclr_lars", ["method={name: plugin, temperature: 0.7}"])
    assert cfg.method.temperature == 0.7
    assert get_method("plugin").__name__ == "Plugin"


def test_the_trainer_names_no_method() -> None:
    """No method class, config class or method-name string, and no isinstance on a method."""
    tree = ast.parse(Path(trainer_module.__file__).read_text())
    forbidden = set(list_methods())
    for name in list_methods():
        forbidden |= {get_method(name).__name__, METHODS.entry(name).config_cls.__name__}
    assert {"simclr", "SimCLR", "BYOLConfig", "barlow_twins"} <= forbidden
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.alias):
            words.add(node.name.rsplit(".", 1)[-1])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            words.update(node.value.replace("/", " ").replace(".", " ").split())
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            assert "Method" not in ast.unparse(node.args[1])
    assert not {w.lower() for w in words} & {f.lower() for f in forbidden}
