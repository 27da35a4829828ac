import math

import pytest
import torch

from ssl_toolkit.methods.byol import byol_loss
from ssl_toolkit.methods.simclr import nt_xent


def _nt_xent_loop(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> float:
    """Plain-Python NT-Xent: views 0..n-1 are z_a, n..2n-1 are z_b; positive of i is i±n."""
    views = [list(map(float, row)) for row in torch.cat([z_a, z_b])]
    n2 = len(views)
    n = n2 // 2

    def cos(u, v):
        dot = sum(a * b for a, b in zip(u, v, strict=True))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))

    total = 0.0
    for i in range(n2):
        positive = (i + n) % n2
        denominator = sum(
            math.exp(cos(views[i], views[j]) / temperature) for j in range(n2) if j != i
        )
        total += -math.log(math.exp(cos(views[i], views[positive]) / temperature) / denominator)
    return total / n2


def test_nt_xent_hand_computed_two_pairs():
    # Views: v0=(1,0), v1=(0,1), v2=(1,1)/√2, v3=(1,-1)/√2 (z_b is given unnormalised).
    z_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z_b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    t = 0.5
    s = 1 / math.sqrt(2)
    e = math.exp
    # cos: v0·v1=0, v0·v2=s, v0·v3=s, v1·v2=s, v1·v3=-s, v2·v3=0
    l0 = -math.log(e(s / t) / (e(0) + e(s / t) + e(s / t)))  # anchor v0, positive v2
    l1 = -math.log(e(-s / t) / (e(0) + e(s / t) + e(-s / t)))  # anchor v1, positive v3
    l2 = -math.log(e(s / t) / (e(s / t) + e(s / t) + e(0)))  # anchor v2, positive v0
    l3 = -math.log(e(-s / t) / (e(s / t) + e(-s / t) + e(0)))  # anchor v3, positive v1
    expected = (l0 + l1 + l2 + l3) / 4
    assert nt_xent(z_a, z_b, temperature=t).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("n,d,temperature", [(1, 3, 0.1), (5, 4, 0.2), (8, 16, 0.5)])
def test_nt_xent_matches_python_loop(n, d, temperature):
    g = torch.Generator().manual_seed(n * 100 + d)
    z_a = torch.randn(n, d, dtype=torch.float64, generator=g)
    z_b = torch.randn(n, d, dtype=torch.float64, generator=g)
    expected = _nt_xent_loop(z_a, z_b, temperature)
    assert nt_xent(z_a, z_b, temperature=temperature).item() == pytest.approx(expected, rel=1e-10)


def test_nt_xent_analytic_gradients_match_finite_differences():
    z_a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, temperature=0.3), (z_a, z_b))


def test_nt_xent_is_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    z_a = torch.randn(6, 8, generator=g).bfloat16()
    z_b = torch.randn(6, 8, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent(z_a, z_b, temperature=0.1)
    assert loss.dtype == torch.float32
    expected = _nt_xent_loop(z_a.double(), z_b.double(), 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_rejects_mismatched_shapes_and_bad_temperature():
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(torch.randn(3, 4), torch.randn(2, 4), temperature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(3, 4), torch.randn(3, 4), temperature=0.0)


def test_byol_loss_hand_computed():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-3.0, 0.0]], dtype=torch.float64)
    # cos = 0, 1, -1  ->  2 - 2cos = 2, 0, 4  -> mean 2
    assert byol_loss(p, z).item() == pytest.approx(2.0, abs=1e-12)
    z2 = torch.tensor([[1.0, 1.0], [1.0, 0.0], [3.0, 1.0]], dtype=torch.float64)
    expected = sum(
        2 - 2 * (a @ b / (a.norm() * b.norm())).item() for a, b in zip(p, z2, strict=True)
    )
    assert byol_loss(p, z2).item() == pytest.approx(expected / 3, rel=1e-12)


def test_byol_loss_detaches_target_and_computes_in_fp32():
    p = torch.randn(4, 5, requires_grad=True)
    z = torch.randn(4, 5, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = byol_loss(p.bfloat16(), z.bfloat16())
    assert loss.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_losses_compute_in_fp32_under_fp16_autocast_on_cuda():
    g = torch.Generator().manual_seed(0)
    z_a = torch.randn(16, 32, generator=g).half()
    z_b = torch.randn(16, 32, generator=g).half()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = nt_xent(z_a.cuda(), z_b.cuda(), temperature=0.1)
        regression = byol_loss(z_a.cuda(), z_b.cuda())
    assert loss.dtype == regression.dtype == torch.float32
    assert loss.item() == pytest.approx(_nt_xent_loop(z_a.double(), z_b.double(), 0.1), rel=1e-5)
    assert regression.item() == pytest.approx(byol_loss(z_a.double(), z_b.double()).item(), 1e-5)
