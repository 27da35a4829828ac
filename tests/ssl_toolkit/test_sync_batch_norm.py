"""Converting a method's batch norms to synchronised ones (the two-process parity test is in
test_multiprocess.py)."""

from __future__ import annotations

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from ssl_toolkit.methods import BYOL
from ssl_toolkit.sync_batch_norm import (
    CPUSyncBatchNorm,
    CPUSyncBatchNormAct,
    convert_sync_batchnorm,
    wants_sync_bn,
)


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
