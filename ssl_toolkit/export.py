"""The trained backbone as a plain state dict, for other projects.

A trainer checkpoint holds the whole method (heads, target networks), the optimizer and the
random state. ``backbone.pt`` holds only the backbone's weights under the names the backbone
module itself uses, so it loads with ``strict=True`` into ``models.build_backbone(...)`` of the
same config and, for a plain torchvision ResNet or timm model, into
``torchvision.models.<name>()`` with ``fc = nn.Identity()`` or ``timm.create_model(name,
num_classes=0)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ssl_toolkit.checkpoint import (
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)

__all__ = ["BACKBONE_FILE", "backbone_state", "export_backbone"]

BACKBONE_FILE = "backbone.pt"
"""The exported backbone's file name in a run directory."""


def backbone_state(model_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``backbone.*`` entries of a method's state dict, without the prefix."""
    prefix = "backbone."
    state = {k.removeprefix(prefix): v for k, v in model_state.items() if k.startswith(prefix)}
    if not state:
        raise ValueError("the model state has no backbone.* entries")
    return state


def export_backbone(
    run_dir: str | Path, out: str | Path | None = None, checkpoint: str | Path | None = None
) -> Path:
    """Write the backbone of a checkpoint (default: the run's newest loadable one, as
    ``--resume auto`` picks it) to ``out`` (default: ``RUN_DIR/backbone.pt``), atomically;
    returns the path. Raises ``CheckpointError`` when there is no such checkpoint or it holds
    no model state."""
    out = Path(out) if out is not None else Path(run_dir) / BACKBONE_FILE
    if checkpoint is not None:
        source, state = Path(checkpoint), load_checkpoint(Path(checkpoint))
    elif (found := load_latest(run_dir)) is not None:
        source, state = found
    else:
        raise CheckpointError(f"no checkpoint in {checkpoint_path(run_dir).parent}")
    model = state.get("model")
    if not isinstance(model, Mapping):
        raise CheckpointError(f"checkpoint {source} holds no model state (not a run's checkpoint)")
    save_checkpoint(out, backbone_state(model))
    return out
