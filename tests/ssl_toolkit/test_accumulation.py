"""Exact gradient accumulation: the loss of a step is taken once, over every micro-batch.

Every check is in float64 against an independent computation: each micro-batch embedded with
autograd, the embeddings concatenated here, and the method's loss taken once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import timm
import torch
from torch import Tensor, nn

from models import PredictionHead, ProjectionHead
from ssl_toolkit.accumulation import accumulate
from ssl_toolkit.methods import BYOL, BarlowTwins, Method, SimCLR

MICRO, COUNT, WIDTH = 16, 4, 16


class _Backbone(nn.Sequential):
    """A tiny image encoder with BatchNorm (or LayerNorm) and ``num_features``."""

    def __init__(self, norm: Callable[[int], nn.Module]) -> None:
        super().__init__(nn.Flatten(), nn.Linear(3 * 8 * 8, WIDTH), norm(WIDTH), nn.ReLU())
        self.num_features = WIDTH


def _head(in_dim: int, out_dim: int, batch_norm: bool) -> nn.Module:
    if batch_norm:
        return ProjectionHead(in_dim, 32, out_dim)
    return nn.Sequential(nn.Linear(in_dim, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, out_dim))


def _method(name: str, batch_norm: bool = True) -> Method:
    """A float64 method with BatchNorm everywhere, or with LayerNorm and no BatchNorm."""
    torch.manual_seed(0)
    backbone = _Backbone(nn.BatchNorm1d if batch_norm else nn.LayerNorm)
    if name == "simclr":
        method = SimCLR(backbone, _head(WIDTH, 8, batch_norm), temperature=0.2)
    elif name == "byol":
        predictor = PredictionHead(8, 32, 8) if batch_norm else _head(8, 8, batch_norm=False)
        method = BYOL(backbone, _head(WIDTH, 8, batch_norm), predictor)
        with torch.no_grad():  # a target apart from the online network, as after training
            for p in method.target.parameters():
                p.add_(0.1 * torch.randn_like(p))
    else:
        method = BarlowTwins(backbone, _head(WIDTH, 8, batch_norm), off_diagonal_weight=0.0051)
    return method.double().train()


def _micro_batches(seed: int = 1) -> list[list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(2, COUNT * MICRO, 3, 8, 8, generator=g, dtype=torch.float64)
    return [[v[i * MICRO : (i + 1) * MICRO] for v in views] for i in range(COUNT)]


def _joined(parts: list) -> object:
    """Embeddings of several micro-batches concatenated along the batch, structure kept."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {key: _joined([p[key] for p in parts]) for key in first}
    return tuple(_joined(list(group)) for group in zip(*parts, strict=True))


def _grads(method: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _assert_same_grads(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Relative 1e-10, each parameter against the norm of the whole gradient (a parameter
    whose exact gradient is 0, like a bias before a standardisation, holds rounding noise)."""
    assert got.keys() == expected.keys()
    scale = torch.cat([g.flatten() for g in expected.values()]).norm()
    for name in expected:
        assert ((got[name] - expected[name]).norm() / scale).item() <= 1e-10, name


def _reference(method: Method, micro_batches: list[list[Tensor]]) -> Tensor:
    """Each micro-batch embedded with autograd, the embeddings joined, one loss."""
    loss = method.loss(_joined([method(views) for views in micro_batches]))
    loss.backward()
    return loss.detach()


METHODS = ["simclr", "byol", "barlow_twins"]


@pytest.mark.parametrize("name", METHODS)
def test_exact_accumulation_is_one_loss_over_the_joined_embeddings(name: str) -> None:
    """With BatchNorm in training mode: the gradients (and loss) of the joined embeddings,
    and the running statistics of ``exact=False`` (one update per micro-batch)."""
    micro_batches = _micro_batches()
    reference, exact, independent = (_method(name) for _ in range(3))
    expected_loss = _reference(reference, micro_batches)
    loss = accumulate(exact, micro_batches, exact=True)
    accumulate(independent, micro_batches, exact=False)

    assert _relative(loss, expected_loss) <= 1e-10
    _assert_same_grads(_grads(exact), _grads(reference))
    for (key, got), (_, want), (_, once) in zip(
        exact.state_dict().items(),
        independent.state_dict().items(),
        reference.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(got, want) and torch.equal(got, once), key
    passes = 1 if name == "simclr" else 2  # SimCLR embeds both views in one pass
    tracked = {
        key: value.item()
        for key, value in exact.named_buffers()
        if key.endswith("num_batches_tracked") and not key.startswith("target.")
    }
    assert tracked and set(tracked.values()) == {COUNT * passes}, tracked


@pytest.mark.parametrize("name", ["simclr", "barlow_twins"])
def test_independent_accumulation_is_not_the_joined_batch(name: str) -> None:
    """What exact accumulation fixes: per-micro-batch negatives and cross-correlations give
    other gradients than the batch the lr is scaled for."""
    micro_batches = _micro_batches()
    reference, independent = _method(name), _method(name)
    _reference(reference, micro_batches)
    accumulate(independent, micro_batches, exact=False)
    got, expected = _grads(independent), _grads(reference)
    assert max(_relative(got[n], expected[n]) for n in expected) > 0.05


def test_independent_accumulation_of_byol_is_already_the_joined_batch() -> None:
    """BYOL's loss is a mean over images: the mean of the micro-batches' losses is the joined
    batch's, so both modes agree."""
    micro_batches = _micro_batches()
    exact, independent = _method("byol"), _method("byol")
    accumulate(exact, micro_batches, exact=True)
    accumulate(independent, micro_batches, exact=False)
    _assert_same_grads(_grads(independent), _grads(exact))


@pytest.mark.parametrize("name", METHODS)
def test_without_batch_norm_exact_accumulation_equals_one_batch(name: str) -> None:
    """LayerNorm backbone and heads: 4 micro-batches of 16 are one batch of 64."""
    micro_batches = _micro_batches()
    one_batch = [torch.cat(views) for views in zip(*micro_batches, strict=True)]
    single, exact = _method(name, batch_norm=False), _method(name, batch_norm=False)
    expected_loss = single.loss(single(one_batch))
    expected_loss.backward()
    loss = accumulate(exact, micro_batches, exact=True)
    assert _relative(loss, expected_loss.detach()) <= 1e-10
    _assert_same_grads(_grads(exact), _grads(single))


def _drop_path_simclr() -> SimCLR:
    torch.manual_seed(0)
    backbone = timm.create_model("test_vit", num_classes=0, drop_path_rate=0.5, img_size=16)
    head = ProjectionHead(backbone.num_features, 32, 8)
    return SimCLR(backbone, head, temperature=0.2).double().train()


def _images(seed: int) -> list[list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    views = torch.randn(2, COUNT * 4, 3, 16, 16, generator=g, dtype=torch.float64)
    return [[v[i * 4 : (i + 1) * 4] for v in views] for i in range(COUNT)]


def test_drop_path_draws_the_same_masks_in_both_passes() -> None:
    """A timm ViT with drop-path: two runs from one seed give identical gradients, and those
    of the reference that draws each micro-batch's masks once: pass 2 replays pass 1."""
    micro_batches = _images(2)
    runs = []
    for _ in range(2):
        method = _drop_path_simclr()
        torch.manual_seed(7)
        accumulate(method, micro_batches, exact=True)
        runs.append(_grads(method))
        after = torch.get_rng_state()
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name

    reference = _drop_path_simclr()
    torch.manual_seed(7)
    _reference(reference, micro_batches)
    _assert_same_grads(runs[1], _grads(reference))
    assert torch.equal(after, torch.get_rng_state()), "the stream continues as after one pass"

    other = _drop_path_simclr()
    torch.manual_seed(8)  # other masks: the comparison above can fail
    _reference(other, micro_batches)
    assert max(_relative(_grads(other)[n], runs[1][n]) for n in runs[1]) > 1e-3


def test_fp16_loss_scaling_scales_the_cached_gradients() -> None:
    """With a GradScaler, the gradients are the scale times the unscaled ones."""
    micro_batches = _micro_batches()
    plain, scaled = _method("simclr"), _method("simclr")
    accumulate(plain, micro_batches)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    accumulate(scaled, micro_batches, scaler=scaler)
    expected = {n: 64.0 * g for n, g in _grads(plain).items()}
    _assert_same_grads(_grads(scaled), expected)


def test_a_single_micro_batch_is_one_plain_pass_and_bad_input_is_refused() -> None:
    """One micro-batch is its own joined batch: one forward pass, the plain gradients."""
    micro_batches = _micro_batches()[:1]
    reference, exact = _method("barlow_twins"), _method("barlow_twins")
    reference.loss(reference(micro_batches[0])).backward()
    passes = []
    exact.register_forward_hook(lambda module, args, out: passes.append(1))
    accumulate(exact, micro_batches)
    assert len(passes) == 1
    got, expected = _grads(exact), _grads(reference)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        accumulate(exact, [])
    with pytest.raises(ValueError, match="takes 2 views"):
        accumulate(exact, [micro_batches[0][:1]])


def test_pass_one_keeps_no_activations() -> None:
    """Between the passes only the embeddings are held: the pass-1 outputs have no graph."""
    method = _method("simclr")
    outputs = []
    method.register_forward_hook(lambda module, args, out: outputs.append(out))
    accumulate(method, _micro_batches())
    first_pass, second_pass = outputs[:COUNT], outputs[COUNT:]
    assert all(z.grad_fn is None for out in first_pass for z in out)
    assert all(z.grad_fn is not None for out in second_pass for z in out)


def test_the_method_is_left_unchanged_but_its_gradients() -> None:
    """Parameters untouched; an optimizer step is the caller's."""
    method = _method("byol")
    before = copy.deepcopy(method.state_dict())
    accumulate(method, _micro_batches(), exact=True)
    after = method.state_dict()
    for key, value in before.items():
        if "running" in key or "num_batches" in key:
            continue  # updated once per micro-batch, as checked above
        assert torch.equal(after[key], value), key
