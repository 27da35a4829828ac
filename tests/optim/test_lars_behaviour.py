"""LARS behaviour beyond the equations: edge cases, state, dtypes, AMP and compilation."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import SmallResNet, make_batch
from torch import nn

from optim import LARS, build_optimizer, lars, name_parameters
from optim.op_count import count_ops

PATHS = [dict(foreach=False), dict(foreach=True), dict(fused=True)]
PATH_IDS = ["single", "foreach", "fused"]


def _named(*tensors: torch.Tensor) -> list[nn.Parameter]:
    params = []
    for i, t in enumerate(tensors):
        p = nn.Parameter(t.clone())
        p.param_name = f"p{i}"
        params.append(p)
    return params


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_zero_initialised_bias_is_updated(path: dict) -> None:
    """||p|| = 0 gives ratio 1, never 0: the bias moves by lr * g on the first step."""
    (bias,) = _named(torch.zeros(4))
    bias.grad = torch.tensor([1.0, -2.0, 0.5, 0.0])
    opt = LARS([bias], lr=0.1, weight_decay=0.0, **path)
    opt.step()
    torch.testing.assert_close(bias.detach(), torch.tensor([-0.1, 0.2, -0.05, 0.0]))
    assert opt.trust_ratios()["p0"].item() == 1.0


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_zero_gradient_without_decay_or_epsilon_gives_ratio_one(path: dict) -> None:
    (w,) = _named(torch.ones(3))
    w.grad = torch.zeros(3)
    opt = LARS([w], lr=0.1, weight_decay=0.0, epsilon=0.0, **path)
    opt.step()
    assert opt.trust_ratios()["p0"].item() == 1.0
    torch.testing.assert_close(w.detach(), torch.ones(3))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_hand_computed_ratio_and_excluded_report_one(path: dict) -> None:
    """||p|| = 5, ||g|| = 1: r = 0.01 * 5 / (1 + 0.1 * 5) = 1/30."""
    w, b = _named(torch.tensor([3.0, 4.0]), torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([0.6, 0.8]), torch.tensor([2.0])
    opt = LARS(
        [w, b],
        lr=1.0,
        momentum=0.0,
        weight_decay=0.1,
        eta=0.01,
        epsilon=0.0,
        exclude_from_layer_adaptation={"p1"},
        **path,
    )
    opt.step()
    ratios = opt.trust_ratios()
    assert ratios["p0"].item() == pytest.approx(1 / 30, rel=1e-6)
    assert ratios["p1"].item() == 1.0
    assert set(opt.trust_ratios(adapted_only=True)) == {"p0"}
    expected_w = (
        torch.tensor([3.0, 4.0]) - (torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([3.0, 4.0])) / 30
    )
    torch.testing.assert_close(w.detach(), expected_w)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - (2.0 + 0.1)]))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_interleaved_exclusions_in_one_bucket_hand_computed(path: dict) -> None:
    """Excluded and adapted tensors in any order share a bucket; each keeps its own flags.
    w: r = 0.01 * 5 / (1 + 0.1 * 5) = 1/30; c (no decay): r = 0.01 * 2 / (1 + 0.1 * 2) = 1/60."""
    b, w, c = _named(torch.tensor([1.0]), torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]))
    b.grad, w.grad, c.grad = torch.tensor([2.0]), torch.tensor([0.6, 0.8]), torch.tensor([1.0, 0.0])
    opt = LARS(
        [b, w, c],
        lr=1.0,
        momentum=0.0,
        weight_decay=0.1,
        eta=0.01,
        epsilon=0.0,
        exclude_from_layer_adaptation={"p0"},
        exclude_from_weight_decay={"p0", "p2"},
        **path,
    )
    opt.step()
    ratios = opt.trust_ratios()
    assert ratios["p0"].item() == 1.0
    assert ratios["p1"].item() == pytest.approx(1 / 30, rel=1e-6)
    assert ratios["p2"].item() == pytest.approx(1 / 60, rel=1e-6)
    assert list(opt.trust_ratios(adapted_only=True)) == ["p1", "p2"]
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 2.0]))
    torch.testing.assert_close(w.detach(), torch.tensor([3.0 - 0.9 / 30, 4.0 - 1.2 / 30]))
    torch.testing.assert_close(c.detach(), torch.tensor([0.0 - 1 / 60, 2.0]))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_unadapted_group_with_mixed_decay_hand_computed(path: dict) -> None:
    """No ratios at all (a float step) and a decay term for p0 only: p -= lr * (g + wd * p)."""
    w, b = _named(torch.tensor([2.0, -4.0]), torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([1.0, 1.0]), torch.tensor([3.0])
    group = {"params": [w, b], "layer_adaptation": False}
    opt = LARS(
        [group], lr=0.1, momentum=0.0, weight_decay=0.5, exclude_from_weight_decay={"p1"}, **path
    )
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([2.0 - 0.1 * 2.0, -4.0 - 0.1 * -1.0]))
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 3.0]))
    assert opt.trust_ratios(adapted_only=True) == {}


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_parameters_without_gradient_are_skipped(path: dict) -> None:
    w, frozen = _named(torch.ones(2), torch.ones(2))
    w.grad = torch.ones(2)
    opt = LARS([w, frozen], lr=0.1, **path)
    opt.step()
    assert torch.equal(frozen.detach(), torch.ones(2))
    assert frozen not in opt.state
    assert set(opt.trust_ratios()) == {"p0"}


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_sparse_gradients_are_rejected(path: dict) -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = LARS(emb.parameters(), lr=0.1, **path)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(lr=0.1, momentum=1.0), "momentum"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
        (dict(lr=0.1, eta=0.0), "eta"),
        (dict(lr=0.1, epsilon=-1.0), "epsilon"),
        (dict(lr=0.1, momentum=0.0, nesterov=True), "Nesterov"),
        (dict(lr=0.1, foreach=True, fused=True), "fused"),
    ],
)
def test_invalid_hyperparameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LARS([nn.Parameter(torch.ones(1))], **kwargs)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_state_dict_round_trip_continues_bit_identically(path: dict, tmp_path) -> None:
    torch.manual_seed(0)
    model = SmallResNet()
    cfg = {"name": "lars", "lr": 0.5, "exclude_from_layer_adaptation": ["@norm"], **path}
    opt = build_optimizer(cfg, model)

    def train(net: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            x, y = make_batch(step)
            net.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()

    train(model, opt, range(5))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    train(model, opt, range(5, 10))

    restored = SmallResNet()
    reopt = build_optimizer(cfg, restored)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    restored.load_state_dict(saved["model"])
    reopt.load_state_dict(saved["opt"])
    train(restored, reopt, range(5, 10))
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], reopt.state[q]["momentum_buffer"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_low_precision_parameters_use_float32_norms(dtype: torch.dtype, path: dict) -> None:
    """Norms of a half tensor whose squares overflow fp16 (300^2 * 4 > 65504) stay finite."""
    (w,) = _named(torch.full((4,), 300.0, dtype=dtype))
    w.grad = torch.full((4,), 300.0, dtype=dtype)
    opt = LARS([w], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.01, epsilon=0.0, **path)
    opt.step()
    ratio = opt.trust_ratios()["p0"]
    assert ratio.dtype == torch.float32
    assert ratio.item() == pytest.approx(0.01)  # ||p|| == ||g||
    assert w.dtype == dtype
    torch.testing.assert_close(w.detach().float(), torch.full((4,), 297.0), rtol=1e-2, atol=0)


VARIANTS = {
    "original": {},
    "update-ratio-lr-outside": {"trust_ratio": "update", "lr_in_buffer": False},
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=list(VARIANTS))
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_grad_scaler_step_equals_fp32_step_and_skips_overflow(path: dict, variant: dict) -> None:
    """scaler.step: unscaled gradients on a normal step; nothing changes on an overflow step."""
    torch.manual_seed(0)
    model = SmallResNet()
    reference = copy.deepcopy(model)
    cfg = {"name": "lars", "lr": 0.5, "exclude_from_layer_adaptation": ["@norm"], **path}
    cfg.update(variant)
    opt = build_optimizer(cfg, model)
    ref_opt = build_optimizer(cfg, reference)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = make_batch(0)
    for net in (model, reference):
        net.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        (scaler.scale(loss) if net is model else loss).backward()
    if path.get("fused"):
        scaler.step(opt)  # dispatch modes cannot run through compiled code: nothing to count
    else:
        assert count_ops(lambda: scaler.step(opt)).syncs == 0
    ref_opt.step()
    scaler.update()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    model.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    model.conv1.weight.grad[0, 0, 0, 0] = float("inf")
    model.fc.bias.grad[0] = float("nan")
    scale_before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale_before / 2
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert torch.equal(opt.state[p]["momentum_buffer"], bufs[n]), n


def test_grad_scaler_after_unscale_uses_found_inf_only() -> None:
    """With scaler.unscale_ first (for clipping), the step sees unscaled grads and found_inf."""
    torch.manual_seed(0)
    model = SmallResNet()
    reference = copy.deepcopy(model)
    opt = build_optimizer({"name": "lars", "lr": 0.5}, model)
    ref_opt = build_optimizer({"name": "lars", "lr": 0.5}, reference)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x, y = make_batch(1)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    nn.functional.cross_entropy(reference(x), y).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_step_compiles_without_graph_break(small_resnet: SmallResNet) -> None:
    opt = build_optimizer(
        {"name": "lars", "lr": 0.5, "exclude_from_layer_adaptation": ["@norm", "@bias"]},
        small_resnet,
    )
    reference = copy.deepcopy(small_resnet)
    ref_opt = build_optimizer(
        {"name": "lars", "lr": 0.5, "exclude_from_layer_adaptation": ["@norm", "@bias"]},
        reference,
    )
    torch._dynamo.reset()
    compiled_step = torch.compile(opt.step, fullgraph=True, backend="eager")
    for step in range(3):
        x, y = make_batch(step)
        for net in (small_resnet, reference):
            net.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
        compiled_step()
        ref_opt.step()
    for p, q in zip(small_resnet.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    explained = torch._dynamo.explain(opt.step)()
    assert explained.graph_break_count == 0


def test_exclusion_names_that_match_no_parameter_are_an_error() -> None:
    """Names given before param_name is set would otherwise silently exclude nothing."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    norm = {"1.weight", "1.bias"}
    with pytest.raises(ValueError, match=r"adaptation names no parameter: 1\.bias, 1\.weight"):
        LARS(model.parameters(), lr=0.1, exclude_from_layer_adaptation=norm)
    name_parameters(model)
    LARS(model.parameters(), lr=0.1, exclude_from_layer_adaptation=norm)
    with pytest.raises(ValueError, match=r"exclude_from_weight_decay names no parameter: 2\.bias"):
        LARS(model.parameters(), lr=0.1, exclude_from_weight_decay={"2.bias"})


def test_fused_cpu_step_compiles_one_graph_for_every_shape() -> None:
    """ResNet-18's 62 tensors in channels-last, of 17 shapes, one with a gradient in another
    memory format (which takes the eager update): one graph, and the single-tensor result."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    cfg = {
        "name": "lars",
        "lr": 0.5,
        "exclude_from_layer_adaptation": ["@norm", "@bias"],
        "exclude_from_weight_decay": ["@norm", "@bias"],
    }
    opt = build_optimizer({**cfg, "fused": True}, model)
    ref_opt = build_optimizer({**cfg, "foreach": False}, reference)
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(3):
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.randn_like(p)  # in the parameter's memory format
            q.grad = p.grad.clone()
        # A gradient laid out unlike its parameter takes the eager update.
        layout_mismatch = model.layer4[1].conv2.weight
        layout_mismatch.grad = layout_mismatch.grad.contiguous()
        opt.step()
        ref_opt.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1
    assert len({p.shape for p in model.parameters()}) == 17
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(
            opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernel_on_views_at_offsets_rounds_once(dtype: torch.dtype) -> None:
    """Half-precision parameters, gradients and momentum buffers as views at odd offsets into
    shared buffers (as with flat gradient buckets): the compiled kernel writes exactly their
    memory, and computes in float32, so its result is the float64 update rounded once, within
    one unit in the last place. Parameter 0 is decayed, parameter 1 is not."""
    torch.manual_seed(0)
    shapes, offsets, sentinel = [(3, 16), (10, 16)], [3, 56], 7.0

    def views_into(values: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        buffer = torch.full((230,), sentinel, dtype=dtype)
        views = []
        for shape, offset, value in zip(shapes, offsets, values):
            view = buffer[offset : offset + value.numel()].view(shape)
            view.copy_(value)
            views.append(view)
        return buffer, views

    start = [torch.randn(shape, dtype=torch.float64) for shape in shapes]
    p_buffer, params = views_into(start)
    g_buffer, grads = views_into([torch.randn(shape, dtype=torch.float64) for shape in shapes])
    b_buffer, bufs = views_into([torch.randn(shape, dtype=torch.float64) / 10 for shape in shapes])
    expected = []
    for p, g, buf, decay in zip(params, grads, bufs, (1e-2, 0.0)):
        w, grad, momentum_buffer = p.double(), g.double(), buf.double()
        ratio = 0.02 * w.norm() / (grad.norm() + 1e-2 * w.norm() + 1e-8)
        new_buf = 0.9 * momentum_buffer + ratio * (grad + decay * w)
        expected.append((w - new_buf, new_buf))
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        lars(
            params,
            grads,
            bufs,
            lr=1.0,
            momentum=0.9,
            weight_decay=1e-2,
            eta=0.02,
            epsilon=1e-8,
            decayed=[True, False],
            fused=True,
        )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1
    ulp = torch.finfo(dtype).eps
    for p, buf, (new_p, new_buf) in zip(params, bufs, expected):
        torch.testing.assert_close(p.double(), new_p, rtol=ulp, atol=0.0)
        torch.testing.assert_close(buf.double(), new_buf, rtol=ulp, atol=0.0)
    for buffer in (p_buffer, g_buffer, b_buffer):
        outside = torch.ones_like(buffer, dtype=torch.bool)
        for shape, offset in zip(shapes, offsets):
            outside[offset : offset + shape[0] * shape[1]] = False
        assert torch.all(buffer[outside] == sentinel)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_functional_call_with_grad_enabled_changes_nothing(path: dict) -> None:
    """An in-place update of a leaf that requires grad fails: the check comes before any
    tensor is touched, so no partial step is left behind."""
    params = [nn.Parameter(torch.randn(64, 16)), nn.Parameter(torch.randn(4))]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    before = [t.detach().clone() for t in (*params, *bufs)]
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-6, eta=1e-3, epsilon=1e-8)
    with pytest.raises(RuntimeError, match="no_grad"):
        lars(params, grads, bufs, **hyper, **path)
    for tensor, old in zip((*params, *bufs), before):
        assert torch.equal(tensor.detach(), old)
