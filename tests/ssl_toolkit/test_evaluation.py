import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_toolkit.cli import USAGE_ERRORS
from ssl_toolkit.config import ExperimentConfig
from ssl_toolkit.data import BadImageError
from ssl_toolkit.evaluation import (
    Evaluator,
    SingleClassError,
    encode,
    eval_datasets,
    extract_features,
    knn_top1,
    linear_eval_sgd,
    linear_probe,
)
from ssl_toolkit.methods import SimCLR
from tests.data.test_folders import _jpeg

# Train points on the unit circle (and beyond); cosine similarity to the query (1, 0) is
# 1, 0.8, 0.6, 0 and -1.
TRAIN = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 2.0], [-3.0, 0.0]])
TRAIN_LABELS = torch.tensor([0, 1, 1, 0, 1])
QUERY = torch.tensor([[1.0, 0.0]])


@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_knn_hand_computed_weights(temperature):
    # k=3 neighbours: (sim 1, class 0), (0.8, class 1), (0.6, class 1).
    class0 = math.exp(1.0 / temperature)
    class1 = math.exp(0.8 / temperature) + math.exp(0.6 / temperature)
    predicted = 0 if class0 > class1 else 1  # T=0.1: 22026 vs 3384 -> 0; T=1: 2.72 vs 4.05 -> 1
    for label in (0, 1):
        acc = knn_top1(
            TRAIN,
            TRAIN_LABELS,
            QUERY,
            torch.tensor([label]),
            k=3,
            temperature=temperature,
            num_classes=2,
        )
        assert acc == (1.0 if label == predicted else 0.0)


def test_knn_weighting_differs_from_majority_vote():
    # A plain majority of the 3 neighbours says class 1; the weighted vote at T=0.1 says 0.
    acc = knn_top1(TRAIN, TRAIN_LABELS, QUERY, torch.tensor([0]), k=3, num_classes=2)
    assert acc == 1.0
    # k larger than the training set is clamped: all 5 vote, T=1 makes class 1 win
    # (e^0.8 + e^0.6 + e^-1 = 4.42 > e^1 + e^0 = 3.72).
    assert knn_top1(
        TRAIN, TRAIN_LABELS, QUERY, torch.tensor([1]), k=50, temperature=1.0, num_classes=2
    ) == (1.0 if math.exp(0.8) + math.exp(0.6) + math.exp(-1) > math.exp(1) + 1 else 0.0)


def _knn_loop(train, train_labels, test, test_labels, k, temperature, num_classes):
    def cos(u, v):
        return sum(a * b for a, b in zip(u, v, strict=True)) / (
            math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v))
        )

    train_rows, test_rows = train.tolist(), test.tolist()
    correct = 0
    for q, label in zip(test_rows, test_labels.tolist(), strict=True):
        sims = sorted(
            ((cos(q, t), c) for t, c in zip(train_rows, train_labels.tolist(), strict=True))
        )[-k:]
        votes = [0.0] * num_classes
        for s, c in sims:
            votes[c] += math.exp(s / temperature)
        correct += max(range(num_classes), key=lambda c: (votes[c], -c)) == label
    return correct / len(test_rows)


@pytest.mark.parametrize("k,temperature,chunk", [(1, 0.1, 1024), (5, 0.07, 7), (20, 0.5, 3)])
def test_knn_matches_python_loop_on_random_data(k, temperature, chunk):
    g = torch.Generator().manual_seed(k)
    train, test = torch.randn(60, 5, generator=g), torch.randn(37, 5, generator=g)
    train_labels = torch.randint(0, 4, (60,), generator=g)
    # Test labels agree with the loop's own predictions half of the time.
    test_labels = torch.randint(0, 4, (37,), generator=g)
    expected = _knn_loop(train, train_labels, test, test_labels, k, temperature, 4)
    got = knn_top1(
        train,
        train_labels,
        test,
        test_labels,
        k=k,
        temperature=temperature,
        num_classes=4,
        chunk_size=chunk,
    )
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= got <= 1.0


def _clusters(per_class: int, seed: int, num_classes: int = 3, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(num_classes, dim) * 4
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    feats = centers[labels] + 0.5 * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_linear_probe_separates_clusters_and_is_deterministic():
    train, train_labels = _clusters(40, seed=0)
    test, test_labels = _clusters(20, seed=1)
    acc = linear_probe(train, train_labels, test, test_labels, num_classes=3, epochs=30)
    assert acc == 1.0
    # On noisy, overlapping data the result depends on the seed only, not on global RNG state.
    noisy_train, noisy_test = torch.randn(90, 16), torch.randn(60, 16)
    noisy_labels, noisy_test_labels = torch.randint(0, 3, (90,)), torch.randint(0, 3, (60,))
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(
            linear_probe(
                noisy_train,
                noisy_labels,
                noisy_test,
                noisy_test_labels,
                num_classes=3,
                epochs=5,
                labels_per_class=10,
                seed=3,
            )
        )
    assert runs[0] == runs[1]


def test_linear_probe_few_labels():
    train, train_labels = _clusters(40, seed=0)
    test, test_labels = _clusters(20, seed=1)
    acc = linear_probe(
        train, train_labels, test, test_labels, num_classes=3, epochs=50, labels_per_class=2
    )
    assert acc == 1.0
    with pytest.raises(ValueError, match="class 2 has only 35 samples"):
        linear_probe(
            train[:-5], train_labels[:-5], test, test_labels, num_classes=3, labels_per_class=36
        )


def test_extract_features_normalises_in_eval_mode_and_restores_mode():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
    encoder.train()
    running_mean = encoder[1].running_mean.clone()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 4, generator=g), torch.arange(5)) for _ in range(3)]
    feats, labels = extract_features(encoder, batches, transform=lambda x: 2 * x)
    assert feats.shape == (15, 6) and labels.tolist() == list(range(5)) * 3
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(15))
    encoder.eval()
    with torch.no_grad():
        expected = nn.functional.normalize(encoder(2 * torch.cat([b for b, _ in batches])), dim=1)
    torch.testing.assert_close(feats, expected)
    encoder.train()
    assert torch.equal(encoder[1].running_mean, running_mean)


def test_features_from_extract_features_feed_knn_and_probe():
    train, train_labels = _clusters(30, seed=0)
    test, test_labels = _clusters(10, seed=1)
    encoder = nn.Identity()
    train_f, train_l = extract_features(encoder, [(train, train_labels)])
    test_f, test_l = extract_features(encoder, [(test, test_labels)])
    assert linear_probe(train_f, train_l, test_f, test_l, num_classes=3) == 1.0
    with torch.inference_mode():  # features computed by a caller under inference_mode
        train_f, test_f = train_f.clone(), test_f.clone()
    assert train_f.is_inference()
    assert linear_probe(train_f, train_l, test_f, test_l, num_classes=3) == 1.0
    assert knn_top1(train_f, train_l, test_f, test_l, num_classes=3) == 1.0


def test_extract_features_with_bound_method_of_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5))
    model = SimCLR(backbone, nn.Linear(5, 3), temperature=0.1).train()
    batches = [(torch.randn(4, 3, 2, 2), torch.zeros(4, dtype=torch.long))]
    feats, _ = extract_features(model.features, batches, None, device="cpu")
    assert model.training and feats.shape == (4, 5)
    assert backbone[2].num_batches_tracked.item() == 0


def test_knn_monitor_is_due_every_n_epochs_and_at_the_last_step():
    cfg = ExperimentConfig.from_dict(
        {"optim": {"name": "lars", "lr": 1.0}, "eval": {"every_epochs": 2}}
    )
    monitor = Evaluator(cfg, steps_per_epoch=5, total_steps=23, device=torch.device("cpu"))
    assert [s for s in range(1, 24) if monitor.should_evaluate(s)] == [10, 20, 23]
    at_end = Evaluator(cfg, steps_per_epoch=5, total_steps=20, device=torch.device("cpu"))
    assert [s for s in range(1, 21) if at_end.should_evaluate(s)] == [10, 20]


def test_sgd_linear_evaluation_learns_and_is_deterministic():
    """The papers' protocol on digits with a fixed random encoder: far above chance (10%)."""
    cfg = ExperimentConfig.from_dict(
        {"optim": {"name": "lars", "lr": 1.0}, "data": {"name": "digits", "num_workers": 0}}
    )

    def encoder() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten()
        )

    epochs = []
    top1 = linear_eval_sgd(
        encoder(),
        cfg,
        torch.device("cpu"),
        epochs=4,
        batch_size=128,
        lr=2.0,
        progress=lambda epoch, loss: epochs.append((epoch, loss)),
    )
    assert [e for e, _ in epochs] == [1, 2, 3, 4]
    assert epochs[-1][1] < epochs[0][1], "the training loss falls"
    assert top1 > 0.6
    again = linear_eval_sgd(encoder(), cfg, torch.device("cpu"), epochs=4, batch_size=128, lr=2.0)
    assert again == top1


def _folder_config(tmp_path: Path, **sections: dict) -> ExperimentConfig:
    data = {"name": "imagefolder", "root": str(tmp_path), "image_size": 16, "num_workers": 0}
    return ExperimentConfig.from_dict(
        {"optim": {"name": "lars", "lr": 1.0}, "data": data | sections.pop("data", {}), **sections}
    )


def _class_folders(root: Path, counts: dict[str, int]) -> None:
    for c, (name, count) in enumerate(counts.items()):
        for i in range(count):
            _jpeg(root / name / f"{i}.jpg", 20, 24, seed=100 * c + i)


def test_eval_root_splits_share_the_class_index_of_train(tmp_path: Path) -> None:
    _class_folders(tmp_path / "eval" / "train", {"cat": 2, "dog": 2, "emu": 2})
    _class_folders(tmp_path / "eval" / "val", {"dog": 2, "emu": 1})
    cfg = _folder_config(tmp_path / "unused", eval={"root": str(tmp_path / "eval")})
    bank, test = eval_datasets(cfg)
    assert bank.classes == ["cat", "dog", "emu"]
    assert test.targets.tolist() == [1, 1, 2]
    names = [bank.classes[label] for label in test.targets.tolist()]
    assert names == [Path(path).parent.name for path in test.files.paths]


def test_one_class_is_an_error_for_evaluation_and_turns_the_evaluator_off(
    tmp_path: Path,
) -> None:
    _class_folders(tmp_path, {"cat": 6})
    cfg = _folder_config(tmp_path)
    with pytest.raises(SingleClassError) as info:
        eval_datasets(cfg)
    assert str(info.value) == (
        f"data.root={str(tmp_path)!r} has one class (cat): the kNN monitor and the probes need "
        "at least two classes"
    )
    assert isinstance(info.value, USAGE_ERRORS), "linear evaluation exits 2 with it"
    monitor = Evaluator(cfg, steps_per_epoch=5, total_steps=20, device=torch.device("cpu"))
    assert not monitor.enabled and not monitor.should_evaluate(20)
    assert monitor.disabled_reason == str(info.value)


def test_encode_with_skip_bad_puts_the_next_image_in_place_and_warns(tmp_path: Path) -> None:
    _class_folders(tmp_path / "train", {"cat": 3, "dog": 3})
    _class_folders(tmp_path / "val", {"cat": 3, "dog": 3})
    bad = tmp_path / "val" / "cat" / "1.jpg"
    bad.write_bytes(b"no longer a jpeg")
    cfg = _folder_config(tmp_path, data={"skip_bad": True})
    _, test = eval_datasets(cfg)
    with pytest.warns(RuntimeWarning) as record:
        features, labels = encode(nn.Flatten(), test, cfg, torch.device("cpu"), normalise=False)
    assert [str(w.message) for w in record if w.category is RuntimeWarning] == [
        f"evaluation: 1 of the images do not decode; data.skip_bad=true put the next one in the "
        f"place of each: {bad}"
    ]
    assert features.shape == (6, 3 * 16 * 16) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(features[1], features[2]), "cat/2.jpg in the place of cat/1.jpg"
    with pytest.raises(BadImageError, match=re.escape(str(bad))):
        encode(nn.Flatten(), test, _folder_config(tmp_path), torch.device("cpu"))


def test_knn_bank_size_caps_the_bank_with_one_fixed_subset() -> None:
    def evaluator(**eval_keys):
        cfg = ExperimentConfig.from_dict(
            {"optim": {"name": "lars", "lr": 1.0}, "data": {"name": "digits"}, "eval": eval_keys}
        )
        return Evaluator(cfg, steps_per_epoch=1, total_steps=1, device="cpu")

    whole = evaluator()._shards[0][0]
    capped = [evaluator(knn_bank_size=300)._shards[0][0] for _ in range(2)]
    assert len(whole) > 1400 and [len(c) for c in capped] == [300, 300]
    assert torch.equal(capped[0].images, capped[1].images)  # the same subset every time
    # Its rows are rows of the whole bank, with their labels, each taken once.
    rows = {(tuple(x.flatten().tolist()), int(y)) for x, y in zip(whole.images, whole.targets)}
    chosen = [
        (tuple(x.flatten().tolist()), int(y)) for x, y in zip(capped[0].images, capped[0].targets)
    ]
    assert set(chosen) <= rows and len(set(chosen)) > 290
    assert len(evaluator(knn_bank_size=5000)._shards[0][0]) == len(whole)
    # Every class still has a few labels for the few-label probe.
    assert capped[0].targets.bincount().min() >= 10
