"""Evaluating frozen representations: weighted kNN monitor and linear probe.

Both take L2-normalised features produced by :func:`extract_features` and return top-1 accuracy
as a fraction in [0, 1] (log ``100 * acc`` if percent is wanted on a dashboard).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["extract_features", "knn_top1", "linear_probe"]


@contextlib.contextmanager
def _eval_mode(encoder: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Put the module behind ``encoder`` (a module or a bound method of one, like
    ``model.embed``) in eval mode for the duration, then restore its previous mode.

    Batch-norm layers left in train mode would normalise with test-batch statistics and overwrite
    their running statistics with evaluation data.
    """
    module = encoder if isinstance(encoder, nn.Module) else getattr(encoder, "__self__", None)
    if not isinstance(module, nn.Module):
        yield
        return
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def extract_features(
    encoder: Callable[[Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    transform: Callable[[Tensor], Tensor] | None = None,
    *,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Encode every ``(images, labels)`` batch and return ``(features, labels)``.

    Images are moved to ``device`` (if given), passed through ``transform`` (if given, e.g.
    normalisation done on the device), then ``encoder``. Runs under ``torch.inference_mode`` with
    the encoder's module in eval mode. Features are flattened, cast to fp32 and L2-normalised;
    features and labels are returned on the encoder's output device, shapes ``(N, D)``, ``(N,)``.
    """
    features, labels = [], []
    with torch.inference_mode(), _eval_mode(encoder):
        for images, targets in batches:
            if device is not None:
                images = images.to(device, non_blocking=True)
            if transform is not None:
                images = transform(images)
            out = encoder(images).flatten(1).float()
            features.append(F.normalize(out, dim=1))
            labels.append(targets.to(out.device))
    if not features:
        raise ValueError("extract_features got no batches")
    return torch.cat(features), torch.cat(labels)


def knn_top1(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.1,
    num_classes: int,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of the weighted kNN classifier of InstDisc / DINO.

    For each test feature, the ``k`` training features with the highest cosine similarity
    ``s`` vote for their labels with weight ``exp(s / temperature)``; the class with the largest
    total wins (ties go to the lowest class index). Features are L2-normalised here, so raw
    features work too. Test features are processed ``chunk_size`` at a time to bound memory.
    """
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"need k >= 1, temperature > 0, chunk_size >= 1; got {k}, {temperature}, {chunk_size}"
        )
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("features and labels must have the same length")
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError("knn_top1 needs at least one training and one test sample")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1).to(train.device)
    train_labels = train_labels.to(train.device, torch.long)
    test_labels = test_labels.to(train.device, torch.long)
    k = min(k, len(train))
    correct = torch.zeros((), dtype=torch.long, device=train.device)
    for start in range(0, len(test), chunk_size):
        sims, idx = (test[start : start + chunk_size] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())
        pred = votes.argmax(dim=1)
        correct += (pred == test_labels[start : start + chunk_size]).sum()
    return correct.item() / len(test)


def _stratified_subset(labels: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """Indices of ``per_class`` random samples of every class present in ``labels``."""
    chosen = []
    for cls in labels.unique(sorted=True).tolist():
        members = (labels == cls).nonzero().flatten()
        if len(members) < per_class:
            raise ValueError(
                f"labels_per_class={per_class} but class {cls} has only {len(members)} samples"
            )
        perm = torch.randperm(len(members), generator=generator)[:per_class]
        chosen.append(members[perm.to(members.device)])
    return torch.cat(chosen)


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
    labels_per_class: int | None = None,
    seed: int = 0,
) -> float:
    """Top-1 test accuracy (fraction in [0, 1]) of a linear classifier on frozen features.

    Multinomial logistic regression: a zero-initialised linear layer minimises cross-entropy
    plus ``weight_decay / 2 · ‖W‖²`` with full-batch L-BFGS (strong-Wolfe line search, initial
    step ``lr``) for at most ``epochs`` iterations, each a pass over all training features, so
    they must fit in memory (true for CIFAR / STL-sized sets). Features are used as given
    (L2-normalised by :func:`extract_features`); per-dimension standardisation is deliberately
    not applied, since with few labels it inflates noise dimensions. ``labels_per_class`` first
    draws a stratified random subset of that many training samples per class (the few-label
    protocol) from ``seed``; nothing else is random and the global RNG is untouched, so the
    result is deterministic.
    """
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("features and labels must have the same length")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = train_feats.device
    # A copy made here is an ordinary tensor even if the features were produced under
    # inference_mode; autograd refuses to save inference tensors for backward.
    x = train_feats.detach().float().clone()
    y = train_labels.detach().to(device, torch.long)
    if labels_per_class is not None:
        generator = torch.Generator().manual_seed(seed)
        subset = _stratified_subset(y.cpu(), labels_per_class, generator).to(device)
        x, y = x[subset], y[subset]
    x_test = test_feats.detach().float().to(device)
    y_test = test_labels.to(device, torch.long)

    classifier = nn.Linear(x.shape[1], num_classes, device=device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(
        classifier.parameters(), lr=lr, max_iter=epochs, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(x), y)
        loss = loss + weight_decay / 2 * classifier.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        pred = classifier(x_test).argmax(dim=1)
    return (pred == y_test).float().mean().item()
