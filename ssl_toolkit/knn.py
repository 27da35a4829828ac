"""The weighted kNN classifier of InstDisc and DINO, on one process or on a sharded bank.

For each query, the ``k`` bank features of highest cosine similarity ``s`` vote for their
labels with weight ``exp(s / temperature)``, and the class with the largest total wins (ties
go to the lowest class index). Equal similarities are ordered by bank index, lowest first, so
which neighbours vote is defined even when similarities tie, and a sharded bank gives the same
answer as one process.

Sharded, every rank keeps only its slice of the bank (the ranks' slices, in rank order, make
the whole bank) and the bank is never gathered. Queries are shared a chunk at a time: each rank
finds the top ``k`` of its own slice for every query of the chunk, and those candidates
(similarity and label) are merged across ranks. Per rank, the memory is the bank
slice plus one chunk of queries, their similarities to the slice, and ``k`` candidates each.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ssl_toolkit.distributed import all_gather_rows, gather_objects, world_size

__all__ = ["BANK_DTYPES", "BankDtype", "knn_correct", "knn_top1"]

BankDtype = Literal["fp32", "fp16"]
"""Precisions a bank's features may be kept in; ``eval.bank_dtype`` is validated against it."""
BANK_DTYPES: dict[str, torch.dtype] = dict(
    zip(get_args(BankDtype), (torch.float32, torch.float16), strict=True)
)
"""The torch dtype of each :data:`BankDtype`."""

QUERY_CHUNK = 256
"""Queries of all ranks scored together (each rank sends its share): the similarities of one
chunk to a bank slice are the largest temporary. The same number on one process and on many
keeps the matrix products the same shape, and so their rounding."""


def _top_k(values: Tensor, k: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` largest of each row, largest first, equal values in column order (lowest
    column first, also where a tie straddles the k-th place): ``(values, columns)``.

    ``topk`` alone leaves open which of several values equal to the k-th it keeps; only the
    rows where that happens (rare with real features) are chosen again, by column, and of
    those only the ``rows`` that matter (a boolean mask; all by default).
    """
    k = min(k, values.shape[1])
    if k == 0:
        return values[:, :0], torch.zeros_like(values[:, :0], dtype=torch.long)
    top, columns = values.topk(k, dim=1)
    kth = top[:, -1:]
    straddling = (values == kth).sum(dim=1) > (top == kth).sum(dim=1)
    if rows is not None:
        straddling &= rows
    straddling = straddling.nonzero().squeeze(1)
    if len(straddling):
        chosen, kth = values[straddling], kth[straddling]
        above, tied = chosen > kth, chosen == kth
        wanted = k - above.sum(dim=1, keepdim=True, dtype=torch.int32)
        keep = above | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= wanted))
        columns[straddling] = keep.nonzero()[:, 1].view(-1, k)
        top[straddling] = chosen.gather(1, columns[straddling])
    columns, order = columns.sort(dim=1)
    order = top.gather(1, order).argsort(dim=1, descending=True, stable=True)
    columns = columns.gather(1, order)
    return values.gather(1, columns), columns


def _candidates(
    queries: Tensor, bank: Tensor, labels: Tensor, k: int, real: Tensor
) -> tuple[Tensor, Tensor]:
    """The top ``k`` of ``bank`` for each query, in :func:`_top_k`'s order: similarities and
    labels, ``k`` columns each; a bank of fewer than ``k`` rows fills the rest with similarity
    -inf, which no real neighbour loses to. Rows not ``real`` (padding) get some ``k``."""
    similarity = (queries.to(bank.dtype) @ bank.T).float()
    inf = float("inf")
    similarity.nan_to_num_(nan=-inf, posinf=inf, neginf=-inf)  # collapsed features vote last
    values, columns = _top_k(similarity, k, real)
    missing = k - values.shape[1]
    votes = labels[columns]
    if missing:
        values = F.pad(values, (0, missing), value=float("-inf"))
        votes = F.pad(votes, (0, missing))
    return values, votes


def _vote(similarity: Tensor, labels: Tensor, temperature: float, num_classes: int) -> Tensor:
    """The predicted class of each row of neighbours."""
    votes = similarity.new_zeros(len(similarity), num_classes)
    votes.scatter_add_(1, labels, (similarity / temperature).exp())
    return votes.argmax(dim=1)


def knn_correct(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.1,
    num_classes: int,
    normalised: bool = False,
    sharded: bool = False,
    chunk_size: int = QUERY_CHUNK,
) -> Tensor:
    """How many queries the weighted kNN classifier gets right, as a 0-d int64 tensor on the
    bank's device.

    Features are L2-normalised here unless ``normalised``. The bank may be fp16 (half the
    memory); similarities are then computed in fp16 and voted on in fp32. ``chunk_size``
    queries are scored at a time.

    ``sharded``, with a process group, makes it a collective that every rank calls: ``bank``
    is this rank's slice of the bank (slices in rank order), ``queries`` this rank's queries
    (any number, even none), and the count returned is every rank's, summed. The result equals
    one process's with the whole bank and all queries, ties included.
    """
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"need k >= 1, temperature > 0, chunk_size >= 1; got {k}, {temperature}, {chunk_size}"
        )
    if len(bank) != len(bank_labels) or len(queries) != len(query_labels):
        raise ValueError("features and labels must have the same length")
    ranks = world_size() if sharded else 1
    rank = dist.get_rank() if ranks > 1 else 0
    sizes = gather_objects((len(bank), len(queries))) if ranks > 1 else [(len(bank), len(queries))]
    bank_size = sum(rows for rows, _ in sizes)
    if bank_size == 0:
        raise ValueError("knn needs at least one bank feature")
    k = min(k, bank_size)
    if not normalised:
        bank = F.normalize(bank.float(), dim=1).to(bank.dtype)
        queries = F.normalize(queries.float(), dim=1)
    device = bank.device
    bank_labels = bank_labels.to(device, torch.long)
    query_labels = query_labels.to(device, torch.long)
    share = -(-chunk_size // ranks)  # this rank's queries per chunk
    rounds = -(-max(count for _, count in sizes) // share)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, rounds * share, share):
        mine = queries[start : start + share].to(device)
        chunk = mine.new_zeros(share, queries.shape[1])
        chunk[: len(mine)] = mine
        real = torch.cat(
            [torch.arange(share, device=device) < min(max(n - start, 0), share) for _, n in sizes]
        )
        if ranks > 1:
            chunk = all_gather_rows(chunk)
        values, labels = _candidates(chunk, bank, bank_labels, k, real)
        if ranks > 1:
            # Every rank's candidates for this rank's queries, rank by rank: as the slices
            # are in rank order, equal values then stand in bank-index order, as on one process.
            mine_of = slice(rank * share, (rank + 1) * share)
            values, labels = (
                all_gather_rows(x.unsqueeze(0))[:, mine_of].permute(1, 0, 2).flatten(1)
                for x in (values, labels)
            )
            values, columns = _top_k(values, k)
            labels = labels.gather(1, columns)
        predicted = _vote(values, labels, temperature, num_classes)[: len(mine)]
        correct += (predicted == query_labels[start : start + share]).sum()
    if ranks > 1:
        dist.all_reduce(correct)
    return correct


def knn_top1(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    query_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.1,
    num_classes: int,
    chunk_size: int = QUERY_CHUNK,
) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of the weighted kNN classifier on one process
    (:func:`knn_correct`)."""
    if len(queries) == 0:
        raise ValueError("knn_top1 needs at least one bank and one query feature")
    correct = knn_correct(
        bank,
        bank_labels,
        queries,
        query_labels,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
    )
    return correct.item() / len(queries)
