"""SwAV's and DINO's losses against float64 re-derivations of the authors' code
(facebookresearch/swav ``main_swav.py``, facebookresearch/dino ``main_dino.py``), and two gloo
processes against one on the joined batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_toolkit.methods import (
    dino_loss,
    sinkhorn,
    swav_loss,
    teacher_temperature,
    updated_center,
)
from tests.ssl_toolkit.test_multiprocess import WORLD, _spawn

BATCH, PROTOTYPES, CROPS = 6, 7, 4


def authors_sinkhorn(out: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """``distributed_sinkhorn`` of main_swav.py on one process (all-reduces are identities)."""
    Q = torch.exp(out / epsilon).t()
    B = Q.shape[1]
    K = Q.shape[0]
    Q = Q / torch.sum(Q)
    for _ in range(iterations):
        Q = Q / torch.sum(Q, dim=1, keepdim=True)
        Q = Q / K
        Q = Q / torch.sum(Q, dim=0, keepdim=True)
        Q = Q / B
    return (Q * B).t()


def authors_swav_loss(output, bs, nmb_crops, crops_for_assign, queue_scores=None):
    """main_swav.py's loss loop on the concatenated crops' scores ``output``."""
    loss = 0
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = output[bs * crop_id : bs * (crop_id + 1)].detach()
            if queue_scores is not None:
                out = torch.cat((queue_scores[i], out))
            q = authors_sinkhorn(out, 0.05, 3)[-bs:]
        subloss = 0
        for v in np.delete(np.arange(np.sum(nmb_crops)), crop_id):
            x = output[bs * v : bs * (v + 1)] / 0.1
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (np.sum(nmb_crops) - 1)
    return loss / len(crops_for_assign)


def authors_dino_loss(student_output, teacher_output, center, temp, ncrops):
    """``DINOLoss.forward`` of main_dino.py, and its ``update_center`` on one process."""
    student_out = (student_output / 0.1).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total_loss += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_loss_terms += 1
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    return total_loss / n_loss_terms, center * 0.9 + batch_center * 0.1


def scores(seed: int, rows: int = BATCH, crops: int = CROPS) -> list[torch.Tensor]:
    """Crops' scores as cosines of random embeddings and prototypes, float64 leaves."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(PROTOTYPES, 5, generator=g, dtype=torch.float64), dim=1)
    crops_ = [
        F.normalize(torch.randn(rows, 5, generator=g, dtype=torch.float64), dim=1)
        for _ in range(crops)
    ]
    return [(z @ prototypes.t()).requires_grad_() for z in crops_]


def test_sinkhorn_matches_the_authors_and_gives_each_sample_one_unit() -> None:
    out = scores(0)[0].detach()
    q = sinkhorn(out)
    torch.testing.assert_close(q, authors_sinkhorn(out, 0.05, 3), rtol=1e-13, atol=0)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(BATCH, dtype=torch.float64))
    # Iterating converges to the equipartition: every prototype gets B / K of the samples.
    share = torch.full((PROTOTYPES,), BATCH / PROTOTYPES, dtype=torch.float64)
    errors = [(sinkhorn(out, iterations=n).sum(dim=0) - share).abs().max() for n in (1, 3, 30)]
    assert errors[0] > errors[1] > errors[2]
    torch.testing.assert_close(sinkhorn(out, iterations=2000).sum(dim=0), share)


@pytest.mark.parametrize("crops_for_assign", [(0, 1), (0,), (1, 3)])
@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_loss_and_gradients_match_the_authors(crops_for_assign, with_queue) -> None:
    crops = scores(1)
    queue = (
        [s.detach() for s in scores(2, rows=12, crops=len(crops_for_assign))]
        if with_queue
        else None
    )
    ours = swav_loss(crops, crops_for_assign=crops_for_assign, queued=queue)
    theirs = authors_swav_loss(torch.cat(crops), BATCH, [2, 2], list(crops_for_assign), queue)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=0)
    # With one crop assigned, that crop's scores get no gradient (its codes are detached).
    grads = [torch.autograd.grad(loss, crops, materialize_grads=True) for loss in (ours, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("epoch", [0, 10, 40])
def test_dino_loss_gradients_and_centre_match_the_authors(epoch: int) -> None:
    student = scores(3)
    teacher = [s.detach() for s in scores(4, crops=2)]
    center = torch.randn(
        1, PROTOTYPES, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    authors_temps = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(100 - 30) * 0.07))
    temp = teacher_temperature(epoch)
    assert temp == pytest.approx(authors_temps[epoch], rel=1e-15)
    ours = dino_loss(student, teacher, center, teacher_temp=temp)
    theirs, their_center = authors_dino_loss(
        torch.cat(student), torch.cat(teacher), center, temp, CROPS
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=0)
    for a, b in zip(torch.autograd.grad(ours, student), torch.autograd.grad(theirs, student)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(updated_center(center, teacher), their_center, rtol=1e-14, atol=0)


def _rank_losses(rank: int, out_dir: Path) -> dict:
    """This rank's half of each crop's rows: SwAV's loss and DINO's, with their gradients."""
    crops = scores(1, rows=WORLD * BATCH)
    mine = [c.detach()[rank * BATCH : (rank + 1) * BATCH].requires_grad_() for c in crops]
    swav = swav_loss(mine)
    center = torch.zeros(1, PROTOTYPES, dtype=torch.float64)
    teacher = [c.detach() * 2 for c in mine[:2]]
    dino = dino_loss(mine, teacher, center)
    return {
        "swav": swav.detach(),
        "swav_grads": torch.autograd.grad(swav, mine),
        "dino": dino.detach(),
        "dino_grads": torch.autograd.grad(dino, mine),
        "center": updated_center(center, teacher),
        "codes": sinkhorn(mine[0].detach()),
    }


def test_two_processes_give_the_joined_batchs_losses_gradients_codes_and_centre(tmp_path) -> None:
    """The codes and centre of 2 processes are those of the joined batch; each process's loss
    is a mean over its rows, so their mean is the joined loss and DDP's mean of their
    gradients is the joined gradient."""
    ranks = _spawn(_rank_losses, tmp_path)
    crops = scores(1, rows=WORLD * BATCH)
    swav = swav_loss(crops)
    center = torch.zeros(1, PROTOTYPES, dtype=torch.float64)
    teacher = [c.detach() * 2 for c in crops[:2]]
    dino = dino_loss(crops, teacher, center)
    for name, loss in (("swav", swav), ("dino", dino)):
        torch.testing.assert_close(
            sum(r[name] for r in ranks) / WORLD, loss.detach(), rtol=1e-13, atol=0
        )
        joined = torch.autograd.grad(loss, crops)
        for rank, result in enumerate(ranks):
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            for a, b in zip(result[f"{name}_grads"], joined):
                torch.testing.assert_close(a / WORLD, b[rows], rtol=1e-12, atol=1e-15)
    codes = sinkhorn(crops[0].detach())
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(
            result["codes"], codes[rank * BATCH : (rank + 1) * BATCH], rtol=1e-13, atol=0
        )
        torch.testing.assert_close(
            result["center"], updated_center(center, teacher), rtol=1e-14, atol=0
        )
