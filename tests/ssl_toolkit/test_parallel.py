"""Where FSDP2 shards a method (the sharded runs themselves are in test_multiprocess.py)."""

from __future__ import annotations

from torch import nn

from models import build_backbone
from ssl_toolkit.parallel import shard_units


def test_units_are_blocks_then_networks_innermost_first_and_the_root_last() -> None:
    method = nn.Module()
    method.backbone = build_backbone("timm/convnext_atto")  # stages that hold blocks
    method.projector = nn.Linear(320, 8)
    method.target = nn.ModuleDict({"backbone": nn.Sequential(nn.Linear(2, 2))})
    units = shard_units(method)
    assert units[-1] == ""
    assert {"backbone", "projector", "target.backbone"} <= set(units)
    assert {f"backbone.stages.{i}" for i in range(4)} <= set(units)
    assert "backbone.stages.0.blocks.0" in units
    for i, name in enumerate(units[:-1]):
        assert not any(inner.startswith(f"{name}.") for inner in units[i + 1 :]), name


def test_resnet_stages_are_units() -> None:
    method = nn.Module()
    method.backbone = build_backbone("resnet18")
    assert shard_units(method) == [
        "backbone.layer1",
        "backbone.layer2",
        "backbone.layer3",
        "backbone.layer4",
        "backbone",
        "",
    ]
