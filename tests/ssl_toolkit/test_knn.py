"""The kNN classifier's neighbour order when similarities tie, against a float64 re-derivation."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_toolkit.knn import _top_k, knn_correct, knn_top1


def knn_reference(bank, bank_labels, queries, query_labels, *, k, temperature, num_classes):
    """The weighted kNN in float64 Python: neighbours by similarity, equal ones by bank index
    (lowest first); the class of the largest vote total wins, the lowest on a tie."""
    bank, queries = bank.double(), queries.double()
    bank = bank / bank.norm(dim=1, keepdim=True)
    queries = queries / queries.norm(dim=1, keepdim=True)
    correct = 0
    for query, label in zip(queries.tolist(), query_labels.tolist(), strict=True):
        sims = [sum(a * b for a, b in zip(query, row, strict=True)) for row in bank.tolist()]
        order = sorted(range(len(sims)), key=lambda i: (-sims[i], i))[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(bank_labels[i])] += math.exp(sims[i] / temperature)
        correct += max(range(num_classes), key=lambda c: (votes[c], -c)) == label
    return correct


def tied_bank(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with three distinct directions only, so that similarities tie in large groups;
    their values are exact in fp32 (cosines of 0, 1 and 1/sqrt(2)-free integer vectors)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return directions[torch.randint(0, 3, (rows,), generator=g)], torch.randint(
        0, 4, (rows,), generator=g
    )


@pytest.mark.parametrize("k", [1, 3, 7, 40])
def test_top_k_orders_ties_by_column(k: int) -> None:
    values = torch.tensor([[0.5, 1.0, 0.5, 0.5, 1.0, -1.0, 0.5, 0.0]] * 2)
    values[1] = values[1].flip(0)
    got_values, got_columns = _top_k(values, k)
    for row in range(2):
        expected = sorted(range(8), key=lambda i: (-values[row, i].item(), i))[:k]
        assert got_columns[row].tolist() == expected
        assert got_values[row].tolist() == values[row, expected].tolist()


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_with_tied_similarities_matches_the_float64_reference(k: int) -> None:
    bank, bank_labels = tied_bank(60, seed=k)
    queries, query_labels = tied_bank(25, seed=k + 100)
    common = {"k": k, "temperature": 0.1, "num_classes": 4}
    expected = knn_reference(bank, bank_labels, queries, query_labels, **common)
    assert knn_correct(bank, bank_labels, queries, query_labels, **common).item() == expected
    flipped = knn_reference(bank.flip(0), bank_labels.flip(0), queries, query_labels, **common)
    got = knn_correct(bank.flip(0), bank_labels.flip(0), queries, query_labels, **common)
    assert got.item() == flipped


def test_equal_neighbours_vote_in_bank_order() -> None:
    """Three copies of one feature, labelled 0, 1, 1: with k=1 the first one votes alone."""
    bank = torch.tensor([[1.0, 0.0]] * 3)
    query = torch.tensor([[2.0, 0.0]])
    for labels, winner in (([0, 1, 1], 0), ([1, 1, 0], 1), ([1, 0, 0], 1)):
        for k, expected in ((1, winner), (3, 1 if labels.count(1) > 1 else 0)):
            got = knn_correct(
                bank, torch.tensor(labels), query, torch.tensor([expected]), k=k, num_classes=2
            )
            assert got.item() == 1, (labels, k)


def test_fp16_bank_keeps_the_neighbours_of_exact_features() -> None:
    bank, bank_labels = tied_bank(60, seed=3)
    queries, query_labels = tied_bank(25, seed=4)
    common = {"k": 5, "temperature": 0.1, "num_classes": 4}
    full = knn_correct(bank, bank_labels, queries, query_labels, **common)
    half = knn_correct(bank.half(), bank_labels, queries, query_labels, **common)
    assert (
        half.item()
        == full.item()
        == knn_reference(bank, bank_labels, queries, query_labels, **common)
    )


def test_nan_features_vote_last_instead_of_failing() -> None:
    bank, bank_labels = tied_bank(10, seed=5)
    bank[0] = float("nan")
    queries, query_labels = tied_bank(4, seed=6)
    common = {"k": 3, "temperature": 0.1, "num_classes": 4}
    got = knn_correct(bank, bank_labels, queries, query_labels, **common)
    assert got.item() == knn_reference(bank[1:], bank_labels[1:], queries, query_labels, **common)


def test_knn_under_a_float64_default_dtype() -> None:
    """Every tensor the classifier makes has its dtype and device set: a float64 default
    (a caller's ``torch.set_default_dtype``) changes nothing."""
    bank, bank_labels = tied_bank(60, seed=7)
    queries, query_labels = tied_bank(25, seed=8)
    common = {"k": 5, "temperature": 0.1, "num_classes": 4}
    expected = knn_reference(bank, bank_labels, queries, query_labels, **common)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = knn_top1(bank, bank_labels, queries, query_labels, **common)
        got_double = knn_top1(bank.double(), bank_labels, queries.double(), query_labels, **common)
    finally:
        torch.set_default_dtype(default)
    assert got == got_double == expected / len(queries)
