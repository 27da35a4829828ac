"""The SwAV and DINO methods against float64 re-derivations of their authors' training loops
(facebookresearch/swav ``main_swav.py``, facebookresearch/dino ``main_dino.py``): multi-crop
forward passes, the prototypes' normalisation, SwAV's queue, DINO's teacher, centre and
temperature; exact accumulation; two gloo processes against one on the joined batch."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import DINOHead, ProjectionHead
from ssl_toolkit.accumulation import accumulate
from ssl_toolkit.methods import DINO, SwAV
from ssl_toolkit.methods.swav import rounded_queue_length
from tests.ssl_toolkit.test_multiprocess import WORLD, _spawn
from tests.ssl_toolkit.test_swav_dino_losses import authors_dino_loss, authors_swav_loss

BATCH, WIDTH, PROTOTYPES, OUT = 6, 12, 10, 14
SIZES = (8, 8, 4, 4, 4)  # two global crops, three local ones
NMB_CROPS = [2, 3]


class _Backbone(nn.Sequential):
    """A tiny encoder for crops of any size (pooled to 4 x 4), with LayerNorm, no BatchNorm."""

    def __init__(self) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, WIDTH), nn.LayerNorm(WIDTH)
        )
        self.num_features = WIDTH


class _Projector(nn.Sequential):
    """SwAV's projection head without its BatchNorm (which couples micro-batches)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(WIDTH, 16), nn.ReLU(), nn.Linear(16, 8))
        self.out_dim = 8


def _views(seed: int, batch: int = BATCH) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g, dtype=torch.float64) for s in SIZES]


def _swav(batch_norm: bool = True, **options) -> SwAV:
    """SwAV on the tiny encoder, with the authors' head or one without BatchNorm."""
    torch.manual_seed(0)
    backbone = _Backbone()
    projector = ProjectionHead(WIDTH, 16, 8) if batch_norm else _Projector()
    return SwAV(backbone, projector, PROTOTYPES, **options).double().train()


def _dino(**options) -> DINO:
    torch.manual_seed(0)
    head = DINOHead(WIDTH, OUT, hidden_dim=16, bottleneck_dim=8)
    return DINO(_Backbone(), head, **options).double().train()


def _by_resolution(backbone: nn.Module, views: list[Tensor]) -> Tensor:
    """The authors' multi-crop forward: one backbone pass per run of one crop size."""
    return torch.cat([backbone(torch.cat(views[:2])), backbone(torch.cat(views[2:]))])


def _authors_swav_output(method: SwAV, views: list[Tensor]) -> Tensor:
    """``model(inputs)``'s scores of main_swav.py: backbone per resolution, head over all
    crops together, L2 normalisation, the prototypes (normalised before the step)."""
    z = F.normalize(method.projector(_by_resolution(method.backbone, views)), dim=1, p=2)
    return z @ method.prototypes.weight.t()


def _grads(loss: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, params))


def test_swav_normalises_its_prototypes_before_each_step_and_matches_the_authors() -> None:
    method = _swav()
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)
    direction = F.normalize(method.prototypes.weight.detach().clone(), dim=1)
    method.before_optimizer_step(1, steps_per_epoch=4)
    weight = method.prototypes.weight.detach()
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(PROTOTYPES, dtype=torch.float64))
    torch.testing.assert_close(weight, direction, rtol=1e-15, atol=1e-15)

    views = _views(1)
    params = list(method.parameters())
    theirs = authors_swav_loss(_authors_swav_output(method, views), BATCH, NMB_CROPS, [0, 1])
    expected = _grads(theirs, params)
    ours = method.training_loss(method(views))
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=0)
    for a, b in zip(_grads(ours, params), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_swav_queue_fills_from_its_epoch_and_is_used_once_full() -> None:
    """Queue of 2 batches from epoch 1 (2 steps an epoch): created before step 3, full after
    step 4; step 5 assigns codes with the embeddings of steps 4 and 3 queued (newest first),
    as main_swav.py does."""
    method = _swav(False, queue_length=2 * BATCH, queue_start_epoch=1)
    pushed: dict[int, Tensor] = {}
    for step in range(1, 6):
        method.before_optimizer_step(step, steps_per_epoch=2)
        views = _views(step)
        with torch.no_grad():
            embeddings = method(views)
            loss = method.loss(embeddings)
            output = _authors_swav_output(method, views)
            z = F.normalize(method.projector(_by_resolution(method.backbone, views)), dim=1)
        assert (method.queue is None) == (step < 3)
        queue = method.queue.clone() if method.queue is not None else None
        if step == 5:
            expected = torch.stack([torch.cat((pushed[4][i], pushed[3][i])) for i in range(2)])
            torch.testing.assert_close(queue, expected, rtol=0, atol=0)
            queue_scores = [q @ method.prototypes.weight.t() for q in queue]
        else:
            queue_scores = None
        theirs = authors_swav_loss(output, BATCH, NMB_CROPS, [0, 1], queue_scores)
        torch.testing.assert_close(loss, theirs, rtol=1e-13, atol=0)
        pushed[step] = torch.stack([z[c * BATCH : (c + 1) * BATCH] for c in (0, 1)])
        method.after_optimizer_step(step, total_steps=10)
    assert method.queued_rows == 3 * BATCH

    restored = _swav(False, queue_length=2 * BATCH, queue_start_epoch=1)
    restored.load_state_dict(method.state_dict())
    restored.load_rank_state_dict(method.rank_state_dict())
    assert restored.queued_rows == method.queued_rows
    assert torch.equal(restored.queue, method.queue)
    for model in (method, restored):
        model.before_optimizer_step(6, steps_per_epoch=2)
    with torch.no_grad():
        assert torch.equal(method.loss(method(_views(6))), restored.loss(restored(_views(6))))


def authors_queue_length(queue_length: int, batch_size: int, world_size: int) -> int:
    """main_swav.py before training:
    ``args.queue_length -= args.queue_length % (args.batch_size * args.world_size)``."""
    queue_length -= queue_length % (batch_size * world_size)
    return queue_length


@pytest.mark.parametrize(
    ("length", "batch", "world"),
    [(3840, 64, 4), (3840, 64, 64), (3000, 64, 4), (100, 64, 2), (0, 64, 8), (65, 64, 1)],
)
def test_queue_length_is_cut_as_main_swav_cuts_it(length: int, batch: int, world: int) -> None:
    assert rounded_queue_length(length, batch, world) == authors_queue_length(length, batch, world)


def _push_steps(method: SwAV, steps: range) -> None:
    for step in steps:
        method.before_optimizer_step(step, steps_per_epoch=2)
        with torch.no_grad():
            method.loss(method(_views(step)))
        method.after_optimizer_step(step, total_steps=10)


def test_swav_queue_is_cut_to_whole_batches_with_a_warning() -> None:
    """A queue of 2 batches and 3 rows holds 2 batches, full after 2 steps; one shorter than
    a batch is no queue (main_swav.py's queue_length 0)."""
    method = _swav(False, queue_length=2 * BATCH + 3, queue_start_epoch=0)
    with pytest.warns(UserWarning, match=f"queue_length {2 * BATCH + 3} is cut to {2 * BATCH}"):
        _push_steps(method, range(1, 2))
    assert method.queue.shape == (2, 2 * BATCH, 8)
    _push_steps(method, range(2, 3))
    method.before_optimizer_step(3, steps_per_epoch=2)
    assert method._queued_scores is not None

    short = _swav(False, queue_length=BATCH - 1, queue_start_epoch=0)
    with pytest.warns(UserWarning, match=f"cut to 0, a multiple of the {BATCH} embeddings"):
        _push_steps(short, range(1, 2))
    _push_steps(short, range(2, 5))
    assert short.queue is None and short.queued_rows == 0


def _cosine_scheduler(base: float, final: float, epochs: int, niter_per_ep: int) -> np.ndarray:
    """utils.py's ``cosine_scheduler`` without warmup."""
    iters = np.arange(epochs * niter_per_ep)
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))


def test_dino_trains_as_the_authors_loop_for_three_epochs() -> None:
    """Three steps of one step an epoch: teacher temperature 0.04 -> 0.055 -> 0.07 (warmup of
    3 epochs), teacher momentum on the cosine from 0.9, centre with momentum 0.9, SGD on the
    student; everything after each step against main_dino.py's loop in float64."""
    method = _dino(teacher_temperature_warmup_epochs=3, tau_base=0.9)
    student = copy.deepcopy(nn.ModuleDict({"backbone": method.backbone, "head": method.head}))
    teacher = copy.deepcopy(method.teacher)
    center = torch.zeros(1, OUT, dtype=torch.float64)
    ours = torch.optim.SGD(
        [p for p in method.trainable_module().parameters() if p.requires_grad], lr=0.5
    )
    theirs = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    temps = np.linspace(0.04, 0.07, 3)
    momentum = _cosine_scheduler(0.9, 1.0, 3, 1)
    for it in range(3):
        views = _views(10 + it)
        method.before_optimizer_step(it + 1, steps_per_epoch=1)
        loss = method.training_loss(method(views))
        loss.backward()
        ours.step()
        ours.zero_grad()
        method.after_optimizer_step(it + 1, total_steps=3)

        teacher_output = teacher["head"](torch.cat([teacher["backbone"](torch.cat(views[:2]))]))
        student_output = student["head"](_by_resolution(student["backbone"], views))
        their_loss, center = authors_dino_loss(
            student_output, teacher_output.detach(), center, temps[it], len(SIZES)
        )
        their_loss.backward()
        theirs.step()
        theirs.zero_grad()
        with torch.no_grad():
            m = momentum[it]
            for param_q, param_k in zip(student.parameters(), teacher.parameters(), strict=True):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)

        torch.testing.assert_close(loss, their_loss, rtol=1e-12, atol=0)
        assert method.teacher_temp == temps[it]
        assert method.tau == momentum[it]
    for mine, authors in ((method.trainable_module(), student), (method.teacher, teacher)):
        for (name, a), b in zip(mine.named_parameters(), authors.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14, msg=name)
    torch.testing.assert_close(method.center, center, rtol=1e-12, atol=1e-15)
    assert method.evaluated_backbone() is method.teacher["backbone"]


def _accumulated(method, views: list[Tensor], exact: bool) -> dict[str, Tensor]:
    halves = [[v[: BATCH // 2] for v in views], [v[BATCH // 2 :] for v in views]]
    accumulate(method, halves if exact else [views], exact=True)
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad(set_to_none=True)
    method.after_optimizer_step(1, total_steps=10)
    return grads


def test_exact_accumulation_gives_the_joined_batchs_gradients_and_state() -> None:
    """Two micro-batches of half the batch: the gradients of one batch, DINO's centre moved
    once from all of the step's teacher outputs, SwAV's queue given all of its rows."""
    views = _views(3)
    for build in (
        lambda: _dino(),
        lambda: _swav(False, queue_length=4 * BATCH, queue_start_epoch=0),
    ):
        joined, split = build(), build()
        for model in (joined, split):
            model.before_optimizer_step(1, steps_per_epoch=4)
        expected, got = _accumulated(joined, views, False), _accumulated(split, views, True)
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-13)
        if isinstance(joined, DINO):
            torch.testing.assert_close(split.center, joined.center, rtol=1e-13, atol=0)
            assert split.center.abs().sum() > 0
        else:
            assert split.queued_rows == joined.queued_rows == BATCH
            torch.testing.assert_close(split.queue, joined.queue, rtol=1e-13, atol=0)


def _rank_step(rank: int, out_dir: Path) -> dict:
    """One step of each method on this rank's half of the batch."""
    results = {}
    for name, method in (("swav", _swav(False)), ("dino", _dino())):
        method.before_optimizer_step(1, steps_per_epoch=4)
        views = [v[rank * BATCH : (rank + 1) * BATCH] for v in _views(5, WORLD * BATCH)]
        loss = method.training_loss(method(views))
        params = [p for p in method.parameters() if p.requires_grad]
        results[name] = {"loss": loss.detach(), "grads": _grads(loss, params)}
        method.after_optimizer_step(1, total_steps=10)
        if name == "dino":
            results[name]["center"] = method.center.clone()
    return results


def test_two_processes_give_the_joined_batchs_loss_gradients_and_centre(tmp_path) -> None:
    """With DDP's mean of the ranks' gradients, 2 processes of half the batch each step as one
    process on the whole batch; DINO's centre is the joined batch's on every rank."""
    ranks = _spawn(_rank_step, tmp_path)
    for name, method in (("swav", _swav(False)), ("dino", _dino())):
        method.before_optimizer_step(1, steps_per_epoch=4)
        loss = method.training_loss(method(_views(5, WORLD * BATCH)))
        params = [p for p in method.parameters() if p.requires_grad]
        joined = _grads(loss, params)
        method.after_optimizer_step(1, total_steps=10)
        mean_loss = sum(r[name]["loss"] for r in ranks) / WORLD
        torch.testing.assert_close(mean_loss, loss.detach(), rtol=1e-12, atol=0)
        for i, expected in enumerate(joined):
            got = sum(r[name]["grads"][i] for r in ranks) / WORLD
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
        if name == "dino":
            for result in ranks:
                center = result[name]["center"]
                torch.testing.assert_close(center, method.center, rtol=1e-13, atol=0)
