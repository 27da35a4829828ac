"""Two gloo ranks, each with half the batch, must reproduce one process on the joined batch."""

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ssl_toolkit.methods.barlow_twins as barlow_module
import ssl_toolkit.methods.simclr as simclr_module
from ssl_toolkit.distributed import (
    DeviceUnavailableError,
    DistContext,
    all_reduce_mean,
    cleanup_distributed,
    setup_distributed,
)
from ssl_toolkit.methods import BarlowTwins, MoCoV3, SimCLR, VICReg
from tests.ssl_toolkit.test_multiprocess import WORLD, _free_port, start_ranks

PER_RANK = 3
TEMPERATURE = 0.2


def _backbone() -> nn.Module:
    # No batch norm: per-rank statistics would legitimately differ from the joined batch.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))


def _model() -> SimCLR:
    return SimCLR(_backbone(), nn.Linear(8, 4), temperature=TEMPERATURE).double()


def _barlow() -> BarlowTwins:
    # A large λ so that the off-diagonal term weighs in the gradients.
    return BarlowTwins(_backbone(), nn.Linear(8, 5), off_diagonal_weight=0.3).double()


def _vicreg() -> VICReg:
    # Weights that make every term count: a variance hinge active in every dimension.
    return VICReg(
        _backbone(), nn.Linear(8, 5), invariance_weight=2.0, covariance_weight=3.0
    ).double()


def _mocov3() -> MoCoV3:
    return MoCoV3(_backbone(), nn.Linear(8, 4), nn.Linear(4, 4), temperature=0.3).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(WORLD * PER_RANK, 6, dtype=torch.float64, generator=g),
        torch.randn(WORLD * PER_RANK, 6, dtype=torch.float64, generator=g),
    )


class _SliceOnlyGather(torch.autograd.Function):
    """The known bug: gather, but backward keeps this rank's slice without summing over ranks."""

    @staticmethod
    def forward(ctx, tensor):
        chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, tensor.contiguous())
        ctx.rows, ctx.rank = tensor.shape[0], dist.get_rank()
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class _SumWithoutGradient(torch.autograd.Function):
    """A sum whose backward ignores the other ranks, as the authors' in-place all_reduce of
    the cross-correlation does (here it also stands in for the batch-statistics sums)."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(ddp: nn.Module, rank: int) -> dict:
    view_a, view_b = _batch()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    ddp.zero_grad(set_to_none=True)
    loss = ddp.module.training_loss(ddp([view_a[rows], view_b[rows]]))
    loss.backward()
    return {"loss": all_reduce_mean(loss.detach()).item(), "grads": _grads(ddp.module)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    ctx = setup_distributed("cpu")
    try:
        ddp = nn.parallel.DistributedDataParallel(_model())
        barlow = nn.parallel.DistributedDataParallel(_barlow())
        scaled = _barlow()
        scaled.gradient_scale = 1 / WORLD  # the recipes' method.gradient_scale
        result = {
            "ctx": (ctx.rank, ctx.world_size, ctx.local_rank, str(ctx.device), ctx.is_main),
            "backend": dist.get_backend(),
            "mean": all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * rank])),
            "correct": _loss_and_grads(ddp, rank),
            "barlow": _loss_and_grads(barlow, rank),
            "barlow_scaled": _loss_and_grads(nn.parallel.DistributedDataParallel(scaled), rank),
            "vicreg": _loss_and_grads(nn.parallel.DistributedDataParallel(_vicreg()), rank),
            "mocov3": _loss_and_grads(nn.parallel.DistributedDataParallel(_mocov3()), rank),
        }
        simclr_module.gather_with_grad = _SliceOnlyGather.apply
        result["slice_only"] = _loss_and_grads(ddp, rank)
        exact_sum = barlow_module.sum_over_ranks
        # The authors' code: batch statistics from SyncBatchNorm (with gradients), then the
        # cross-correlation (the only 2-d sum) all-reduced in place, blind to autograd.
        barlow_module.sum_over_ranks = lambda t: (
            _SumWithoutGradient.apply(t) if t.ndim == 2 else exact_sum(t)
        )
        result["barlow_authors"] = _loss_and_grads(barlow, rank)
        barlow_module.sum_over_ranks = _SumWithoutGradient.apply
        result["barlow_no_grad_sum"] = _loss_and_grads(barlow, rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        cleanup_distributed()
        raise
    cleanup_distributed(sync=True)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    start_ranks(_worker, (_free_port(), str(out_dir)))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _joined_batch(model: nn.Module) -> tuple[float, dict]:
    view_a, view_b = _batch()
    loss = model.loss(model([view_a, view_b]))
    loss.backward()
    return loss.item(), _grads(model)


@pytest.fixture(scope="module")
def single_process():
    return _joined_batch(_model())


@pytest.fixture(scope="module")
def barlow_single_process():
    return _joined_batch(_barlow())


@pytest.fixture(scope="module")
def vicreg_single_process():
    return _joined_batch(_vicreg())


@pytest.fixture(scope="module")
def mocov3_single_process():
    return _joined_batch(_mocov3())


def test_setup_distributed_reads_torchrun_env_and_uses_gloo(rank_results):
    for rank, result in enumerate(rank_results):
        assert result["ctx"] == (rank, WORLD, rank, "cpu", rank == 0)
        assert result["backend"] == "gloo"
        torch.testing.assert_close(result["mean"], torch.tensor([1.5, 5.0]))


# (result key, the single-process fixture it must equal): SimCLR's gathered NT-Xent, Barlow
# Twins' batch statistics and cross-correlation summed over ranks and VICReg's gathered
# embeddings, all with gradients, and MoCo v3's keys gathered without.
CORRECT = [
    ("correct", "single_process"),
    ("barlow", "barlow_single_process"),
    ("vicreg", "vicreg_single_process"),
    ("mocov3", "mocov3_single_process"),
]
# The known bugs: a gather whose backward keeps this rank's slice, and the authors' in-place
# all_reduce, blind to autograd. Both leave the loss right and the gradients wrong.
BUGGY = [("slice_only", "single_process"), ("barlow_no_grad_sum", "barlow_single_process")]


@pytest.mark.parametrize("key, reference", CORRECT)
def test_two_ranks_reproduce_loss_and_gradients_of_joined_batch(
    rank_results, request, key: str, reference: str
):
    ref_loss, ref_grads = request.getfixturevalue(reference)
    for result in rank_results:
        assert result[key]["loss"] == pytest.approx(ref_loss, rel=1e-12)
        assert result[key]["grads"].keys() == ref_grads.keys()
        for name, grad in result[key]["grads"].items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_gradient_scale_reproduces_the_barlow_authors_gradient(rank_results):
    """The authors' in-place all_reduce of the cross-correlation gives 1 / world size of the
    exact gradient; ``gradient_scale = 1 / world size`` on the exact gradient gives the same,
    and keeps the loss."""
    for result in rank_results:
        exact, scaled, authors = (result[k] for k in ("barlow", "barlow_scaled", "barlow_authors"))
        assert scaled["loss"] == pytest.approx(authors["loss"], rel=1e-12)
        for name, grad in scaled["grads"].items():
            torch.testing.assert_close(grad, authors["grads"][name], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(grad * WORLD, exact["grads"][name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("key, reference", BUGGY)
def test_known_bugs_are_detected(rank_results, request, key: str, reference: str):
    """The comparison above is sensitive: each bug changes gradients, not the loss."""
    ref_loss, ref_grads = request.getfixturevalue(reference)
    for result in rank_results:
        assert result[key]["loss"] == pytest.approx(ref_loss, rel=1e-12)
        weight = "projector.weight"
        assert not torch.allclose(result[key]["grads"][weight], ref_grads[weight])


def test_single_process_context_and_helpers(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = setup_distributed("cpu")
    assert ctx == DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert ctx.is_main and not ctx.is_distributed
    assert not dist.is_initialized()
    t = torch.tensor([2.0])
    assert all_reduce_mean(t) is t
    cleanup_distributed()  # no process group: must be a no-op


def test_device_choice_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="device must be one of"):
        setup_distributed("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup_distributed("auto").device == torch.device("cpu")
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        setup_distributed("cuda")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x'"):
        setup_distributed("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_follows_local_rank(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert setup_distributed("auto").device == torch.device("cuda", 0)
    assert setup_distributed("cuda").device == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(DeviceUnavailableError, match="LOCAL_RANK"):
        setup_distributed("cuda")
