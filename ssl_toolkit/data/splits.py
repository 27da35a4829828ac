"""Fixed, stratified splits of labelled data, shared by image folders, tar shards and digits.

One module holds them so that the datasets and the shards both import it, and neither imports
the other: a labelled image folder and the shards written from it are split alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["fixed_split", "stratified_split"]


def stratified_split(
    labels: Tensor, count: Callable[[int], int], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Indices ``(chosen, rest)``: ``count(n_c)`` random samples of every class c, and the others.

    Classes are visited in sorted order and each class's members are permuted with
    ``generator``, so the same generator state gives the same split. Both index tensors list
    class by class, in permuted order.
    """
    chosen, rest = [], []
    # One stable sort groups the members of every class, each in index order.
    grouped = labels.argsort(stable=True)
    counts = labels.unique(sorted=True, return_counts=True)[1].tolist()
    for members in grouped.split(counts):
        members = members[torch.randperm(members.numel(), generator=generator).to(members.device)]
        take = count(members.numel())
        chosen.append(members[:take])
        rest.append(members[take:])
    return torch.cat(chosen), torch.cat(rest)


def fixed_split(targets: Tensor, train: bool) -> Tensor:
    """The sorted indices of the fixed stratified 80/20 split (seed 0): the train part, or the
    test part. The same labels always give the same split, whichever dataset holds them."""
    split = stratified_split(targets, lambda n: round(0.8 * n), torch.Generator().manual_seed(0))
    return split[0 if train else 1].sort().values
