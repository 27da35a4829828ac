"""Converting a method's batch norms to synchronised ones, and SwAV's groups of ranks (the
two-process parity test over all ranks is in test_multiprocess.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from ssl_toolkit.methods import BYOL
from ssl_toolkit.sync_batch_norm import (
    CPUSyncBatchNorm,
    CPUSyncBatchNormAct,
    convert_sync_batchnorm,
    sync_bn_group,
    sync_bn_groups,
    wants_sync_bn,
)
from tests.ssl_toolkit.test_multiprocess import WORLD, _bn_batch, _bn_model, _bn_step, _spawn


def _byol() -> BYOL:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(1))
    backbone.num_features = 4

    def head(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Linear(i, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, o))

    return BYOL(nn.Sequential(backbone, nn.AdaptiveAvgPool1d(4)), head(4, 3), head(3, 3))


def test_every_batch_norm_is_converted_keeping_its_tensors() -> None:
    model = _byol()
    before = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    model.eval()
    assert convert_sync_batchnorm(model, torch.device("cpu")) is model
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert norms == {
        "backbone.0.1",
        "projector.1",
        "predictor.1",
        "target.backbone.0.1",
        "target.projector.1",
    }
    assert all(isinstance(model.get_submodule(n), CPUSyncBatchNorm) for n in norms)
    assert all(not model.get_submodule(n).training for n in norms)
    assert all(p is before[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())


def test_one_process_is_a_plain_batch_norm() -> None:
    torch.manual_seed(0)
    plain = nn.BatchNorm1d(5, momentum=None)
    sync = convert_sync_batchnorm(nn.BatchNorm1d(5, momentum=None), torch.device("cpu"))
    x = torch.randn(8, 5) * 3 + 1
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)


def test_auto_means_more_than_one_process() -> None:
    assert wants_sync_bn("auto", 2) and not wants_sync_bn("auto", 1)
    assert wants_sync_bn(True, 1) and not wants_sync_bn(False, 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_uses_torchs_sync_batch_norm() -> None:
    model = _byol().cuda()
    convert_sync_batchnorm(model, torch.device("cuda"))
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {nn.SyncBatchNorm}


def test_timm_norm_act_layers_keep_their_activation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU))
    x = torch.randn(6, 3, 5, 5)
    expected = model(x)
    convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(model[1], CPUSyncBatchNormAct) and isinstance(model[1].act, nn.ReLU)
    torch.testing.assert_close(model(x), expected)
    assert (model(x) >= 0).all()


def apex_groups(world_size: int, group_size: int) -> tuple[list[list[int]], list[int]]:
    """apex.parallel.create_syncbn_process_group's loop (main_swav.py, ``--sync_bn apex``):
    the ranks of every group created, and the group each rank keeps."""
    groups, mine = [], []
    for group_num in range(world_size // group_size):
        groups.append(list(range(group_num * group_size, (group_num + 1) * group_size)))
    for rank in range(world_size):
        mine.append(next(g for g in range(len(groups)) if rank // group_size == g))
    return groups, mine


@pytest.mark.parametrize(("world", "size"), [(64, 8), (16, 8), (8, 8), (4, 1), (6, 2)])
def test_groups_are_apexs_runs_of_consecutive_ranks(world: int, size: int) -> None:
    groups, mine = apex_groups(world, size)
    assert sync_bn_groups(world, size) == groups
    assert all(rank in groups[mine[rank]] for rank in range(world))
    assert sync_bn_groups(world, None) == [list(range(world))]


@pytest.mark.parametrize(("world", "size"), [(4, 8), (12, 8), (3, 2)])
def test_a_group_size_must_divide_the_processes(world: int, size: int) -> None:
    with pytest.raises(ValueError, match=f"{size} does not divide the {world} processes"):
        sync_bn_groups(world, size)


def _grouped_bn_job(rank: int, out_dir: Path) -> dict[int, Any]:
    rows = _bn_batch().chunk(WORLD)[rank]
    results = {}
    for size in (1, WORLD):
        model = convert_sync_batchnorm(_bn_model(False), torch.device("cpu"), sync_bn_group(size))
        results[size] = _bn_step(nn.parallel.DistributedDataParallel(model), rows)
    return results


def test_two_processes_in_groups_of_one_and_of_two(tmp_path: Path) -> None:
    """Groups of 1 normalise each rank's batch alone, as a plain batch norm per rank; a group
    of both ranks, as one process on the joined batch."""
    ranks = _spawn(_grouped_bn_job, tmp_path)
    joined = _bn_step(_bn_model(False), _bn_batch())
    torch.testing.assert_close(
        torch.cat([r[WORLD]["out"] for r in ranks]), joined["out"], rtol=1e-10, atol=1e-12
    )
    for rank, result in enumerate(ranks):
        alone = _bn_step(_bn_model(False), _bn_batch().chunk(WORLD)[rank])
        torch.testing.assert_close(result[1]["out"], alone["out"], rtol=1e-10, atol=1e-12)
        for name, value in alone["buffers"].items():
            torch.testing.assert_close(result[1]["buffers"][name], value, msg=name)
    assert not torch.allclose(torch.cat([r[1]["out"] for r in ranks]), joined["out"])
