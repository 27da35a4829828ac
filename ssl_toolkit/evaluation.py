"""Evaluating frozen representations: weighted kNN, linear probe, and the kNN monitor.

:func:`knn_top1` and :func:`linear_probe` take L2-normalised features produced by
:func:`extract_features` (or :func:`encode`, which also prepares the images the way training
does) and return top-1 accuracy as a fraction in [0, 1]. :class:`Evaluator` is the trainer's
component: it says when a kNN evaluation is due and runs it, and runs the end-of-run probes.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from optim import ConfigError
from ssl_toolkit.config import ExperimentConfig
from ssl_toolkit.data import (
    CropViews,
    DatasetNotFoundError,
    InMemoryImageDataset,
    TwoViewAugment,
    ViewPolicy,
    build_dataset,
    build_loader,
    stratified_split,
)
from ssl_toolkit.data.augment import IMAGENET_MEAN, IMAGENET_STD
from ssl_toolkit.data.folders import ImageFolderCenter, ImageFolderViews
from ssl_toolkit.data.functional import normalize
from ssl_toolkit.distributed import all_gather_rows, gather_objects
from ssl_toolkit.knn import BANK_DTYPES, knn_correct, knn_top1

__all__ = [
    "Evaluator",
    "Probes",
    "SingleClassError",
    "bank_subset",
    "encode",
    "eval_datasets",
    "extract_features",
    "knn_correct",
    "knn_top1",
    "linear_eval_sgd",
    "linear_probe",
    "shard_dataset",
]


@contextlib.contextmanager
def _eval_mode(encoder: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Put the module behind ``encoder`` (a module or a bound method of one, like
    ``model.features``) in eval mode for the duration, then restore its previous mode.

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
    normalise: bool = True,
) -> tuple[Tensor, Tensor]:
    """Encode every ``(images, labels)`` batch and return ``(features, labels)``.

    Images are moved to ``device`` (if given), passed through ``transform`` (if given, e.g.
    normalisation done on the device), then ``encoder``. Runs under ``torch.inference_mode`` with
    the encoder's module in eval mode. Features are flattened, cast to fp32 and L2-normalised
    (unless ``normalise=False``);
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
            features.append(F.normalize(out, dim=1) if normalise else out)
            labels.append(targets.to(out.device))
    if not features:
        raise ValueError("extract_features got no batches")
    return torch.cat(features), torch.cat(labels)


def _smallest_class(labels: Tensor) -> tuple[int, int]:
    """The label with the fewest samples (the lowest such label on a tie) and its count."""
    classes, counts = labels.unique(sorted=True, return_counts=True)
    smallest = int(counts.argmin())
    return int(classes[smallest]), int(counts[smallest])


def _few_labels(labels: Tensor, per_class: int, seed: int) -> Tensor:
    """Indices of ``per_class`` random samples of every class, drawn from ``seed``."""
    cls, count = _smallest_class(labels)
    if count < per_class:
        raise ValueError(f"labels_per_class={per_class} but class {cls} has only {count} samples")
    generator = torch.Generator().manual_seed(seed)
    return stratified_split(labels, lambda _: per_class, generator)[0]


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
        subset = _few_labels(y.cpu(), labels_per_class, seed).to(device)
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


def linear_eval_sgd(
    encoder: Callable[[Tensor], Tensor],
    cfg: ExperimentConfig,
    device: torch.device,
    *,
    epochs: int = 90,
    batch_size: int = 256,
    lr: float = 0.1,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> float:
    """The papers' linear evaluation: top-1 (a fraction) of a linear classifier on frozen
    features, trained with SGD on random-resized-crop and flip views.

    As SimCLR's appendix B.6 and BYOL's appendix C.1 do: Nesterov momentum 0.9, no weight
    decay, an lr of ``lr x batch_size / 256`` decayed on a cosine over ``epochs`` epochs, views
    cropped from the full image (area 0.08-1) and flipped, test images centre-cropped as
    :func:`encode` prepares them. The encoder runs in eval mode, without gradients; its
    features are used as they are (not normalised). ``progress(epoch, loss)`` is called after
    each epoch. Deterministic for a ``seed`` on CPU.
    """
    datasets = eval_datasets(cfg)
    if datasets is None:
        raise DatasetNotFoundError("linear evaluation needs labels: set eval.root")
    train_set, test_set = datasets
    size = cfg.data.image_size
    if isinstance(train_set, ImageFolderCenter):  # crop in the workers, from the full image
        train_set = ImageFolderViews(train_set.files, CropViews(size=size, seed=seed))
    loader = build_loader(
        train_set,
        batch_size,
        generator=torch.Generator().manual_seed(seed),
        num_workers=cfg.data.num_workers,
        skip_bad=cfg.data.skip_bad,
    )
    crop_and_flip = ViewPolicy(jitter_p=0.0, gray_p=0.0)
    augment = TwoViewAugment(crop_and_flip, crop_and_flip, out_size=size)
    augment_generator = torch.Generator(device).manual_seed(seed)
    test, test_labels = encode(encoder, test_set, cfg, device, normalise=False)
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(test.shape[1], int(train_set.targets.max()) + 1)
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.01, generator=generator)
        classifier.bias.zero_()
    classifier.to(device)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=lr * batch_size / 256, momentum=0.9, nesterov=True
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    with _eval_mode(encoder):
        for epoch in range(epochs):
            loss_sum = torch.zeros((), device=device)
            for images, labels in loader:
                if isinstance(images, list | tuple):  # two crops cut in the workers
                    images = tuple(x.to(device) for x in images)
                else:
                    images = images.to(device)
                view, _ = augment(images, augment_generator)
                with torch.no_grad():
                    features = encoder(view).flatten(1).float()
                loss = F.cross_entropy(classifier(features), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.detach()
            if progress is not None:
                progress(epoch + 1, loss_sum.item() / len(loader))
    with torch.no_grad():
        predictions = classifier(test).argmax(dim=1)
    return (predictions == test_labels.to(predictions.device)).float().mean().item()


class SingleClassError(DatasetNotFoundError):
    """The labelled data has one class: every kNN vote and linear probe would score 100%, a
    number that says nothing; evaluating needs at least two classes."""


def eval_datasets(cfg: ExperimentConfig) -> tuple[Dataset, Dataset] | None:
    """The labelled splits to evaluate on: the kNN bank / probe training set, and the test set.

    They are ``eval.root``'s (a labelled image folder) when it is set, else ``cfg.data``'s;
    ``None`` when the data has no labels (an unlabelled image folder) and ``eval.root`` is
    unset. Both splits share the bank's class index. Labelled data of one class raises
    :class:`SingleClassError`.
    """
    size = cfg.data.image_size
    index_dir = cfg.data.index_dir
    skip_bad = cfg.data.skip_bad
    if cfg.eval.root is not None:
        key, root = "eval.root", cfg.eval.root
        bank, test = (
            build_dataset(
                "imagefolder", root=root, train=train, image_size=size, index_dir=index_dir
            )
            for train in (True, False)
        )
        if (bank.targets < 0).all():
            raise DatasetNotFoundError(
                f"eval.root={root!r} has no class sub-folders: the kNN monitor and "
                "the probes need labelled images"
            )
    else:
        key, root = "data.root", cfg.data.root
        bank_split = {"split": "train"} if cfg.data.name == "stl10" else {}
        bank = build_dataset(
            cfg.data.name,
            root=root,
            image_size=size,
            index_dir=index_dir,
            skip_bad=skip_bad,
            num_classes=cfg.data.num_classes,
            **bank_split,
        )
        if (bank.targets < 0).all():
            return None
        test = build_dataset(
            cfg.data.name,
            root=root,
            train=False,
            image_size=size,
            index_dir=index_dir,
            skip_bad=skip_bad,
            num_classes=cfg.data.num_classes,
        )
    if len(bank.classes) < 2:
        raise SingleClassError(
            f"{key}={root!r} has one class ({', '.join(bank.classes)}): the kNN monitor and "
            "the probes need at least two classes"
        )
    return bank, test


def encode(
    encoder: Callable[[Tensor], Tensor],
    dataset: Dataset,
    cfg: ExperimentConfig,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
    *,
    normalise: bool = True,
) -> tuple[Tensor, Tensor]:
    """Features of every image (L2-normalised unless ``normalise=False``): resized to
    ``data.image_size``, normalised. With ``data.skip_bad``, an image that does not decode
    is replaced by the next one, with a warning that lists them."""
    size = cfg.data.image_size
    mean = torch.tensor(IMAGENET_MEAN, device=device)
    std = torch.tensor(IMAGENET_STD, device=device)

    def transform(images: Tensor) -> Tensor:
        x = images.to(device, non_blocking=True).float() / 255.0
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return normalize(x, mean, std).contiguous(memory_format=memory_format)

    loader = build_loader(
        dataset,
        cfg.eval.batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=cfg.data.num_workers,
        skip_bad=cfg.data.skip_bad,
    )
    features = extract_features(encoder, iter(loader), transform, normalise=normalise)
    if loader.skipped:
        shown = ", ".join(loader.skipped[:5]) + (", ..." if len(loader.skipped) > 5 else "")
        warnings.warn(
            f"evaluation: {len(loader.skipped)} of the images do not decode; data.skip_bad=true "
            f"put the next one in the place of each: {shown}",
            RuntimeWarning,
            stacklevel=2,
        )
    return features


def shard_dataset(dataset: Dataset, rank: int, world_size: int) -> tuple[Dataset, int]:
    """Rank ``rank``'s contiguous slice of ``dataset``, padded to the same length on every rank.

    Padding repeats the slice's last item (or the dataset's first), so that every rank runs
    the same number of batches, which sharded models need. Returns the shard and how many of
    its items are real.
    """
    per_rank = -(-len(dataset) // world_size)
    start = min(rank * per_rank, len(dataset))
    indices = list(range(start, min(start + per_rank, len(dataset))))
    real = len(indices)
    indices += [indices[-1] if indices else 0] * (per_rank - real)
    if isinstance(dataset, InMemoryImageDataset):
        index = torch.tensor(indices, dtype=torch.long)
        return InMemoryImageDataset(dataset.images[index], dataset.targets[index]), real
    return Subset(dataset, indices), real


@dataclass(frozen=True)
class Probes:
    """Top-1 accuracies (fractions) of frozen features: weighted kNN, and the linear probe with
    all labels and with ``labels_per_class`` labels per class."""

    knn_top1: float
    linear_top1: float
    linear_top1_few_labels: float
    labels_per_class: int


def _sendable(error: Exception | None) -> Exception | None:
    """``error`` as another process can receive it: itself if it pickles, else a
    ``RuntimeError`` with its type and text."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def _check_labels_per_class(bank: Dataset, labels_per_class: int) -> None:
    """Raise :class:`ConfigError` before training when the few-label probe at the end would
    ask a class of the bank for more labelled images than it has."""
    labels = torch.as_tensor(bank.targets)
    index, count = _smallest_class(labels[labels >= 0])
    if labels_per_class > count:
        names = getattr(bank, "classes", None) or []
        name = names[index] if index < len(names) else str(index)
        raise ConfigError(
            [
                f"eval.labels_per_class: {labels_per_class} is more than class {name!r} of the "
                f"evaluation bank has ({count} images); the largest value allowed is {count}"
            ]
        )


class Evaluator:
    """Evaluates the backbone's features: a kNN monitor during training, probes at the end.

    The kNN monitor is due at the end of every ``eval.every_epochs``-th epoch and at the last
    step of the run (once, even when both hold). Every rank takes part: each encodes its shard
    of the bank and of the test set and keeps its bank shard (in ``eval.bank_dtype``); the
    sharded kNN (:func:`~ssl_toolkit.knn.knn_correct`) shares the test features a chunk at a
    time and merges each rank's candidates, so the bank is never gathered. ``eval.knn_bank_size``
    caps the bank with a fixed random subset. No rank waits in a collective while another works
    alone. Without labelled data (:func:`eval_datasets` gives ``None``), or with one class only
    (:class:`SingleClassError`), it is not :attr:`enabled`, nothing is due, and
    :attr:`disabled_reason` says why.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        steps_per_epoch: int,
        total_steps: int,
        device: torch.device,
        memory_format: torch.memory_format = torch.contiguous_format,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.cfg = cfg
        self.every_steps = cfg.eval.every_epochs * steps_per_epoch
        self.total_steps = total_steps
        self.device = device
        self.memory_format = memory_format
        self.rank = rank
        self.world_size = world_size
        self.disabled_reason: str | None = None
        """Why there is nothing to evaluate on (``None`` when :attr:`enabled`), for the trainer
        to say in one line before it trains on without the kNN monitor and the probes."""
        try:
            datasets = eval_datasets(cfg)
        except SingleClassError as error:  # training on one class still runs; scoring it cannot
            datasets, self.disabled_reason = None, str(error)
        else:
            if datasets is None:
                self.disabled_reason = (
                    "the data has no labels (set eval.root to a labelled image folder)"
                )
        self._shards = None
        if datasets is not None:
            bank, test = datasets
            self.num_classes = len(bank.classes)
            if cfg.eval.knn_bank_size is not None:
                bank = bank_subset(bank, cfg.eval.knn_bank_size)
            _check_labels_per_class(bank, cfg.eval.labels_per_class)
            self._shards = [
                (*shard_dataset(dataset, rank, world_size), len(dataset))
                for dataset in (bank, test)
            ]

    @property
    def enabled(self) -> bool:
        """True when there are labelled images of two classes or more to evaluate on."""
        return self._shards is not None

    def should_evaluate(self, step: int) -> bool:
        """True after step ``step`` (1-based) when a kNN evaluation is due."""
        return self.enabled and (step % self.every_steps == 0 or step == self.total_steps)

    def _features(self, encoder: Callable[[Tensor], Tensor]) -> tuple[Tensor, ...]:
        """This rank's real rows of bank features (in ``eval.bank_dtype``) and labels, then of
        test features and labels."""
        if self._shards is None:
            raise RuntimeError("no labelled data to evaluate on (see Evaluator.enabled)")
        (bank_shard, bank_real, _), (test_shard, test_real, _) = self._shards
        dtype = BANK_DTYPES[self.cfg.eval.bank_dtype]
        bank, bank_labels = self._encode_shard(encoder, bank_shard, dtype)
        test, test_labels = self._encode_shard(encoder, test_shard)
        return bank[:bank_real], bank_labels[:bank_real], test[:test_real], test_labels[:test_real]

    def _encode_shard(
        self,
        encoder: Callable[[Tensor], Tensor],
        shard: Dataset,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """This rank's shard encoded (cast to ``dtype`` when given); an error on any rank (an
        image that does not decode) is raised on every rank, so that none goes on to a
        collective the others never reach."""
        features, error = None, None
        try:
            features, labels = encode(encoder, shard, self.cfg, self.device, self.memory_format)
            features = (features.to(dtype) if dtype is not None else features), labels
        except Exception as caught:
            error = caught
        errors = [e for e in gather_objects(_sendable(error)) if e is not None]
        if error is not None:
            raise error
        if errors:
            raise errors[0]
        return features

    def _knn_top1(self, bank: Tensor, bank_labels: Tensor, test: Tensor, labels: Tensor) -> float:
        """kNN top-1 of every rank's test rows against the sharded bank."""
        correct = knn_correct(
            bank,
            bank_labels,
            test,
            labels,
            k=self.cfg.eval.knn_k,
            temperature=self.cfg.eval.knn_temperature,
            num_classes=self.num_classes,
            normalised=True,
            sharded=True,
        )
        return correct.item() / self._shards[1][2]

    def knn_top1(self, encoder: Callable[[Tensor], Tensor]) -> float:
        """kNN top-1 (a fraction) of ``encoder``'s features of the test split; every rank
        must call it, and every rank gets the result."""
        return self._knn_top1(*self._features(encoder))

    def probes(self, encoder: Callable[[Tensor], Tensor]) -> Probes:
        """kNN and linear probes of ``encoder``'s features; every rank must call it.

        The linear probes train on every feature, so for them (only) the bank and test
        features are gathered, and every rank trains the same deterministic L-BFGS probes
        (:func:`linear_probe`) and gets the same result.
        """
        features = self._features(encoder)
        knn = self._knn_top1(*features)
        bank, bank_labels, test, test_labels = (_gather_ragged(x) for x in features)
        bank = bank.float()
        few = self.cfg.eval.labels_per_class
        common = {"num_classes": self.num_classes}
        return Probes(
            knn_top1=knn,
            linear_top1=linear_probe(bank, bank_labels, test, test_labels, **common),
            linear_top1_few_labels=linear_probe(
                bank,
                bank_labels,
                test,
                test_labels,
                labels_per_class=few,
                seed=self.cfg.trainer.seed,
                **common,
            ),
            labels_per_class=few,
        )


def _gather_ragged(rows: Tensor) -> Tensor:
    """Every rank's ``rows`` concatenated in rank order, when ranks hold different counts."""
    counts = gather_objects(len(rows))
    padded = rows.new_zeros(max(counts), *rows.shape[1:])
    padded[: len(rows)] = rows
    parts = all_gather_rows(padded).split(max(counts))
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


def bank_subset(bank: Dataset, size: int) -> Dataset:
    """``size`` images of ``bank`` drawn at random with a fixed seed (the same subset in every
    run and on every rank), in index order; the whole bank when it has no more."""
    if size >= len(bank):
        return bank
    chosen = torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[:size]
    index = chosen.sort().values
    if isinstance(bank, InMemoryImageDataset):
        return InMemoryImageDataset(bank.images[index], bank.targets[index], bank.classes)
    subset = Subset(bank, index.tolist())
    subset.targets = torch.as_tensor(bank.targets)[index]
    subset.classes = bank.classes
    return subset
