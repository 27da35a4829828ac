"""LARS: layer-wise adaptive rate scaling (You et al., 2017, arXiv:1708.03888).

The default behaviour reproduces the original minerva LARS: the paper's trust ratio, the learning
rate inside the momentum buffer, and weight decay on every parameter. Two options give the
variants the SSL papers ran (docs/lars.md): the ratio taken on the update ``g + λp``
(``trust_ratio="update"``: SimCLR, BYOL, Barlow Twins, VICReg, MoCo v3) and the learning rate
applied outside the buffer (``lr_in_buffer=False``: BYOL, Barlow Twins, VICReg, MoCo v3). Unlike
the original, the ratio is computed on the device with ``torch.where``, so ``step()`` never
waits for the GPU.

Each step splits a param group into one bucket per device and dtype (and device mesh, for sharded
parameters); which tensors are adapted and which decayed travel with the bucket as per-tensor
flags, adapted tensors first, so exclusions never split a bucket. Every bucket runs one of three
interchangeable implementations:

* single-tensor: a Python loop over parameters (the reference shape of the algorithm);
* multi-tensor: ``torch._foreach_*`` kernels, a constant number of ops whatever the bucket size;
* fused: compiled by ``torch.compile`` so that each parameter crosses memory as few times as the
  equations allow: on CUDA the multi-tensor code becomes a few kernels; on CPU each large
  tensor's update becomes one kernel over its memory, after the single-tensor path's norms (one
  small graph for every size, so the first step compiles in seconds).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

if dist.is_available():
    from torch.distributed.tensor import DTensor

__all__ = ["LARS", "TrustRatio", "lars"]

TrustRatio = Literal["original", "update"]
"""Which trust ratio LARS takes: the paper's, or the one on the update ``g + λp``."""
_TRUST_RATIOS = get_args(TrustRatio)

# As torch does: multi-tensor kernels on CUDA. On CPU scripts/bench_optim.py measures the
# single-tensor path faster (each tensor's update runs while it is in cache): 0.7x the
# multi-tensor path's time on ResNet-50.
_FOREACH_BY_DEFAULT = {"cuda": True, "cpu": False}


class LARS(Optimizer):
    """Layer-wise Adaptive Rate Scaling with momentum, exact to the original minerva LARS.

    For every parameter ``p`` with gradient ``g`` (docs/lars.md)::

        r   = eta * ||p|| / (||g|| + weight_decay * ||p|| + epsilon)   (1 if not adapted,
                                                                        ||p|| == 0 or denom == 0)
        d   = g + weight_decay * p                                     (0 decay if excluded)
        buf = momentum * buf + lr * r * d
        p  -= buf

    ``trust_ratio="update"`` takes ``r = eta * ||p|| / ||d||`` instead (1 where either norm is
    0; ``epsilon`` unused), and ``lr_in_buffer=False`` accumulates ``buf = momentum * buf + r * d``
    and steps ``p -= lr * buf``. With the paper's ratio and the lr outside the buffer (apex's
    LARC), a tensor with ``||p|| == 0`` or ``||g|| == 0`` takes ``d = g`` with ``r = 1``, as LARC
    leaves it: a zero gradient then moves it by its momentum only.

    Args:
        params: parameters or param groups. A group may set ``layer_adaptation=False`` to exclude
            all its parameters from adaptation.
        lr: learning rate (it sits inside the momentum buffer, as in the original).
        momentum: momentum factor in [0, 1).
        weight_decay: L2 coefficient, also part of the trust-ratio denominator.
        eta: trust coefficient.
        epsilon: added to the trust-ratio denominator.
        exclude_from_layer_adaptation: exact ``param.param_name`` values that keep ratio 1.
        exclude_from_weight_decay: exact ``param.param_name`` values that get no decay term.
        trust_clip: LARC clipping, effective lr = min(lr, r) instead of lr * r.
        nesterov: Nesterov momentum.
        trust_ratio: ``"original"`` (the paper's ratio) or ``"update"`` (the ratio of the weight
            norm to the norm of the decayed gradient, as SimCLR's and BYOL's code take it).
        lr_in_buffer: the learning rate multiplies what enters the momentum buffer (the
            original, and SimCLR's code); False applies it to the buffer at the step, so that a
            schedule changes the step at once (BYOL, Barlow Twins, VICReg, MoCo v3, timm).
        foreach: multi-tensor path; ``None`` picks the faster path for the device.
        fused: compile the update with ``torch.compile`` (needs a working compiler; the first
            step pays the compilation).
        unscale_in_step: under a ``GradScaler``, take its scale and overflow flag into the step,
            with no host sync. False lets the scaler unscale the gradients and check them for
            overflow before the step, as its own path does for any optimizer: what a trainer
            that clips gradients after ``unscale_`` needs (Lightning refuses to clip for an
            optimizer that unscales in its step).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 0.001,
        epsilon: float = 1e-8,
        exclude_from_layer_adaptation: Iterable[str] | None = None,
        *,
        exclude_from_weight_decay: Iterable[str] | None = None,
        trust_clip: bool = False,
        nesterov: bool = False,
        trust_ratio: TrustRatio = "original",
        lr_in_buffer: bool = True,
        foreach: bool | None = None,
        fused: bool = False,
        unscale_in_step: bool = True,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum} (must be in [0, 1))")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        if eta <= 0.0:
            raise ValueError(f"Invalid eta: {eta} (must be > 0)")
        if epsilon < 0.0:
            raise ValueError(f"Invalid epsilon: {epsilon} (must be >= 0)")
        if nesterov and momentum <= 0.0:
            raise ValueError("Nesterov momentum requires momentum > 0")
        if fused and foreach:
            raise ValueError("`fused` and `foreach` cannot both be True")
        if trust_ratio not in _TRUST_RATIOS:
            raise ValueError(f"Invalid trust_ratio: {trust_ratio!r} (one of {_TRUST_RATIOS})")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eta=eta,
            epsilon=epsilon,
            trust_clip=trust_clip,
            nesterov=nesterov,
            trust_ratio=trust_ratio,
            lr_in_buffer=lr_in_buffer,
            layer_adaptation=True,
        )
        super().__init__(params, defaults)
        self.exclude_set = set(exclude_from_layer_adaptation or ())
        self.exclude_from_weight_decay = set(exclude_from_weight_decay or ())
        self._check_exclusions()
        self.foreach = foreach
        self.fused = fused
        # GradScaler hands over `grad_scale` and `found_inf` instead of unscaling and checking
        # for overflow itself, which would cost a host sync per step.
        self._step_supports_amp_scaling = unscale_in_step
        self._last_ratios: list[_BucketRatios] = []

    def __setstate__(self, state: dict[str, Any]) -> None:
        """State saved before the variants existed was the original's."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("trust_ratio", "original")
            group.setdefault("lr_in_buffer", True)

    def _check_exclusions(self) -> None:
        """Exclusion names must name parameters: a typo, or names given before ``param_name``
        was set, would otherwise silently exclude nothing."""
        names = {
            getattr(p, "param_name", None) for group in self.param_groups for p in group["params"]
        }
        for option, excluded in (
            ("exclude_from_layer_adaptation", self.exclude_set),
            ("exclude_from_weight_decay", self.exclude_from_weight_decay),
        ):
            unknown = sorted(excluded - names)
            if unknown:
                raise ValueError(
                    f"LARS {option} names no parameter: {', '.join(unknown)}. Names are "
                    "matched against param.param_name (optim.name_parameters(model) sets it)."
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        last_ratios = []
        for group_index, group in enumerate(self.param_groups):
            for bucket in self._gather_buckets(group_index, group):
                ratios = lars(
                    bucket.params,
                    bucket.grads,
                    bucket.bufs,
                    lr=group["lr"],
                    momentum=group["momentum"],
                    weight_decay=group["weight_decay"],
                    eta=group["eta"],
                    epsilon=group["epsilon"],
                    adapted=bucket.adapted,
                    decayed=bucket.decayed,
                    trust_clip=group["trust_clip"],
                    nesterov=group["nesterov"],
                    trust_ratio=group["trust_ratio"],
                    lr_in_buffer=group["lr_in_buffer"],
                    foreach=self.foreach,
                    fused=self.fused,
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                )
                larc = group["trust_ratio"] == "original" and not group["lr_in_buffer"]
                last_ratios.append(
                    _BucketRatios(
                        bucket.names, bucket.adapted, ratios, bucket.params[0].device, larc
                    )
                )
        # In place: torch.compile(step, fullgraph=True) of torch 2.11 cannot rebind an attribute.
        self._last_ratios[:] = last_ratios
        return loss

    def _gather_buckets(self, group_index: int, group: dict[str, Any]) -> list[_Bucket]:
        """Parameters with gradients in buckets keyed by (device, dtype, device mesh of sharded
        parameters), the adapted ones first in each."""
        adapted: dict[tuple, list[tuple]] = {}
        others: dict[tuple, list[tuple]] = {}
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"LARS does not support sparse gradients "
                    f"(parameter {getattr(p, 'param_name', index)!r})"
                )
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            name = getattr(p, "param_name", None) or f"group{group_index}.param{index}"
            adapt = group["layer_adaptation"] and name not in self.exclude_set
            decay = name not in self.exclude_from_weight_decay
            key = (p.device, p.dtype, getattr(p, "device_mesh", None))
            entry = (name, p, state["momentum_buffer"], decay)
            (adapted if adapt else others).setdefault(key, []).append(entry)
        buckets = []
        for key in dict.fromkeys([*adapted, *others]):
            entries = adapted.get(key, []) + others.get(key, [])
            names, params, bufs, decayed = (list(column) for column in zip(*entries))
            grads = [p.grad for p in params]
            buckets.append(_Bucket(names, params, grads, bufs, len(adapted.get(key, [])), decayed))
        return buckets

    def trust_ratios(self, adapted_only: bool = False) -> dict[str, Tensor]:
        """The ratio applied in the last step, per ``param_name``, as 0-d tensors on device.

        Parameters not adapted report 1.0 (left out with ``adapted_only=True``), and so do
        LARC's tensors with a zero gradient (its adaptive lr). With ``trust_clip`` the applied
        ratio is min(r / lr, 1). Reading them costs no host sync.
        """
        ratios: dict[str, Tensor] = {}
        for bucket in self._last_ratios:
            if bucket.ratios is not None:
                values = bucket.ratios
                if bucket.larc:  # the step's 0 where LARC skipped a zero gradient
                    values = torch.where(values == 0, 1.0, values)
                ratios.update(zip(bucket.names, values.unbind()))
            if not adapted_only and bucket.adapted < len(bucket.names):
                one = torch.ones((), device=bucket.device)
                ratios.update(dict.fromkeys(bucket.names[bucket.adapted :], one))
        return ratios


class _Bucket(NamedTuple):
    names: list[str]
    params: list[Tensor]
    grads: list[Tensor]
    bufs: list[Tensor]
    adapted: int  # the first `adapted` tensors get trust ratios
    decayed: list[bool]


@dataclass
class _BucketRatios:
    names: list[str]
    adapted: int
    ratios: Tensor | None
    device: torch.device
    larc: bool  # the ratios are _larc_ratio's


def lars(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float,
    epsilon: float,
    adapted: int | None = None,
    decayed: Sequence[bool] | None = None,
    trust_clip: bool = False,
    nesterov: bool = False,
    trust_ratio: TrustRatio = "original",
    lr_in_buffer: bool = True,
    foreach: bool | None = None,
    fused: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor | None:
    """Functional LARS update of one bucket (same device and dtype) in place.

    The first ``adapted`` tensors (default: all) get trust ratios, the rest ratio 1;
    ``decayed[i]`` (default: all True) says whether tensor ``i`` gets the weight-decay term.
    ``trust_ratio`` and ``lr_in_buffer`` select the variant (see :class:`LARS`).
    Returns the applied trust ratios of the adapted tensors stacked in a 1-d float32 tensor
    (float64 for float64 parameters; LARC's are 0 where it skips a zero gradient:
    :func:`_larc_ratio`), or None when none is adapted. ``grad_scale`` divides the
    gradients; a nonzero ``found_inf`` leaves parameters and momentum untouched. Neither needs a
    host sync.
    """
    if not params:
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        # Checked up front: an in-place update failing halfway would leave a partial step.
        raise RuntimeError("lars() updates parameters in place: call it under torch.no_grad()")
    norm_group = _shard_group(params[0])
    if norm_group is not None:
        # Sharded parameters (FSDP2): update the local shards; the norms are of whole tensors.
        params, grads, bufs = ([t.to_local() for t in ts] for ts in (params, grads, bufs))
        foreach, fused = True, False
    kwargs = dict(
        momentum=momentum,
        weight_decay=weight_decay,
        eta=eta,
        epsilon=epsilon,
        adapted=len(params) if adapted is None else adapted,
        decays=_decays(weight_decay, decayed),
        trust_clip=trust_clip,
        nesterov=nesterov,
        on_update=trust_ratio == "update",
        lr_in_buffer=lr_in_buffer,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
    if fused:
        # The same precision as the ratios: a float64 bucket keeps its float64 learning rate.
        norm_dtype = _norm_dtype(params[0].dtype)
        lr_tensor = torch.full((), lr, dtype=norm_dtype, device=params[0].device)
        if params[0].device.type == "cpu":
            # The single-tensor shape, each tensor's update one compiled kernel: compiling
            # the whole bucket instead took 26 s on ResNet-50 on a 2-core CPU.
            return _single_tensor_lars(
                params, grads, bufs, lr=lr_tensor, update_=_fused_tensor_update_, **kwargs
            )
        return _compiled_multi_tensor_lars()(params, grads, bufs, lr=lr_tensor, **kwargs)
    if foreach is None:
        foreach = _FOREACH_BY_DEFAULT.get(params[0].device.type, False)
    if not foreach:
        return _single_tensor_lars(params, grads, bufs, lr=lr, **kwargs)
    return _multi_tensor_lars(params, grads, bufs, lr=lr, norm_group=norm_group, **kwargs)


def _decays(weight_decay: float, decayed: Sequence[bool] | None) -> float | list[float]:
    """The weight-decay coefficient of every tensor: one float when they all share it."""
    if decayed is None or all(decayed):
        return weight_decay
    if not any(decayed):
        return 0.0
    return [weight_decay if decay else 0.0 for decay in decayed]


def _shard_group(param: Tensor) -> Any:
    """The process group over which a sharded (DTensor) parameter's shards are spread, or None.

    Only parameters sharded along one mesh dimension (FSDP2) are supported: the squared norms
    of their local shards add up to the squared norm of the whole parameter.
    """
    if not (dist.is_available() and isinstance(param, DTensor)):
        return None
    placements = param.placements
    if len(placements) != 1 or not placements[0].is_shard():
        raise NotImplementedError(
            f"LARS supports parameters sharded along one mesh dimension, got {placements}"
        )
    return param.device_mesh.get_group()


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms of fp16/bf16 tensors are taken in float32; float64 keeps its precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _trust_ratio(
    w_norm: Tensor, g_norm: Tensor, weight_decay: float, eta: float, epsilon: float
) -> Tensor:
    """The paper's ratio, 1 where the weight norm or the denominator is zero (on device)."""
    denom = torch.add(g_norm, w_norm, alpha=weight_decay) if weight_decay else g_norm
    return _ratio_of_norms(w_norm, denom + epsilon, eta)


def _larc_ratio(
    w_norm: Tensor,
    g_norm: Tensor,
    weight_decay: float,
    eta: float,
    epsilon: float,
    lr: float | Tensor,
    trust_clip: bool,
) -> Tensor:
    """The applied ratio of apex's LARC (the paper's ratio, the lr outside the buffer).

    Where ``||p||`` and ``||g||`` are both > 0, the (clipped) ratio; elsewhere LARC leaves the
    gradient as it is and adds no decay. One ratio gives both: 1 where ``||p|| == 0`` (the
    decay term is 0 there), 0 where ``||g|| == 0`` (``r·(g + λp)`` is then 0, as LARC's
    ``g``), so that only the momentum moves such a tensor; the clipping never applies there.
    """
    denom = torch.add(g_norm, w_norm, alpha=weight_decay) if weight_decay else g_norm
    ratio = _applied_ratio(eta * w_norm / (denom + epsilon), lr, trust_clip)
    # `w_norm == 0` in place of the constant 1.0: no more ops than the other variants' where.
    return torch.where(torch.minimum(w_norm, g_norm) > 0, ratio, w_norm == 0)


def _ratio_of_norms(w_norm: Tensor, denom: Tensor, eta: float) -> Tensor:
    """``eta * w_norm / denom``, 1 where either is zero; with ``denom`` the norm of the decayed
    gradient this is the ratio on the update (``trust_ratio="update"``)."""
    ratio = eta * w_norm / denom
    # Norms and weight decay are >= 0, so min(w, denom) > 0 holds exactly when both are > 0.
    return torch.where(torch.minimum(w_norm, denom) > 0, ratio, 1.0)


def _decayed_grad(grad: Tensor, param: Tensor, decay: float) -> Tensor:
    """``g + decay * p``, the update whose norm ``trust_ratio="update"`` takes."""
    return grad.add(param, alpha=decay) if decay else grad


def _foreach_decayed_grads(
    grads: list[Tensor], params: list[Tensor], decays: float | list[float]
) -> list[Tensor]:
    """:func:`_decayed_grad` of every tensor, in one or two multi-tensor ops."""
    if isinstance(decays, list):
        return torch._foreach_add(grads, torch._foreach_mul(params, decays))
    return torch._foreach_add(grads, params, alpha=decays) if decays else grads


def _applied_ratio(ratio: Tensor, lr: float | Tensor, trust_clip: bool) -> Tensor:
    """LARC clipping turns lr * r into min(lr, r): the applied ratio is min(r / lr, 1)."""
    return torch.clamp(ratio / lr, max=1.0) if trust_clip else ratio


class _Overflow(NamedTuple):
    """What a GradScaler overflow changes: the gradient is dropped, momentum and step are held."""

    keep: Tensor  # 0-d bool: False when the gradients overflowed
    step_mask: Tensor  # 0-d, 1 or 0, multiplies the step
    momentum: Tensor  # 0-d, the momentum factor or 1, so that the buffer stays as it was


def _overflow(found_inf: Tensor | None, momentum: float, like: Tensor) -> _Overflow | None:
    if found_inf is None:
        return None
    keep = found_inf.to(like.device) == 0
    mask = keep.to(like.dtype)
    held = torch.where(keep, torch.full((), momentum, dtype=like.dtype, device=like.device), 1.0)
    return _Overflow(keep, mask, held)


def _update_scale(
    lr: float | Tensor, lr_in_buffer: bool, overflow: _Overflow | None
) -> float | Tensor | None:
    """What multiplies the update subtracted from ``p``: the learning rate when it sits outside
    the buffer, times 0 on a GradScaler overflow; None when that is 1."""
    if lr_in_buffer:
        return None if overflow is None else overflow.step_mask
    return lr if overflow is None else overflow.step_mask * lr


def _tensor_update_(
    p: Tensor,
    g: Tensor,
    buf: Tensor,
    step: float | Tensor,
    decayed_step: float | Tensor | None,
    momentum: float,
    held: float | Tensor,
    nesterov: bool,
    update_scale: float | Tensor | None,
) -> None:
    """One tensor's update in place: ``buf = held * buf + step * g + decayed_step * p`` (see
    _multi_tensor_lars), then ``p -= update_scale * buf``, or the Nesterov look-ahead
    (:func:`_update_scale`)."""
    buf.mul_(held)
    _add_scaled_(buf, g, step)
    if decayed_step is not None:
        _add_scaled_(buf, p, decayed_step)
    if nesterov:
        update = buf.mul(momentum)
        _add_scaled_(update, g, step)
        if decayed_step is not None:
            _add_scaled_(update, p, decayed_step)
    else:
        update = buf
    if update_scale is None:
        p.sub_(update)
    elif isinstance(update_scale, Tensor):
        p.addcmul_(update, update_scale, value=-1)
    else:
        p.sub_(update, alpha=update_scale)


def _fused_tensor_update_(
    p: Tensor,
    g: Tensor,
    buf: Tensor,
    step: Tensor,
    decayed_step: Tensor | None,
    momentum: float,
    held: float | Tensor,
    nesterov: bool,
    update_scale: Tensor | None,
) -> None:
    """:func:`_tensor_update_` as one compiled kernel over the tensors' memory, in rows of
    ``_LANES`` values: one graph serves every size and memory format.

    Only the number of rows is dynamic: a kernel of dynamic length checks for its tail at
    every vector and ran at half the speed of a static one. Small tensors, whose update costs
    less than the compiled call (about 25 us on CPU), sizes that are no multiple of ``_LANES``
    and tensors laid out differently from each other (a gradient in another memory format)
    take the eager update. The kernel computes half-precision tensors in float32 and rounds
    once; the eager ops round after each step.
    """
    numel = p.numel()
    if not (
        numel > _FUSED_MIN_NUMEL
        and numel % _LANES == 0
        and _is_dense(p)
        and p.stride() == g.stride() == buf.stride()
    ):
        _tensor_update_(p, g, buf, step, decayed_step, momentum, held, nesterov, update_scale)
        return
    rows = (_rows(p), _rows(g), _rows(buf))
    for tensor in rows:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    # Every operand a tensor, the step detached from the bucket's step sizes it views: graphs
    # then differ only by dtype and Nesterov, and a new momentum value compiles nothing.
    _compiled_tensor_update()(
        *rows,
        step.detach(),
        _operand(0.0 if decayed_step is None else decayed_step, step),
        _operand(momentum, step),
        _operand(held, step),
        nesterov,
        _operand(1.0 if update_scale is None else update_scale, step),
    )


def _operand(value: float | Tensor, like: Tensor) -> Tensor:
    """``value`` as a 0-d tensor of ``like``'s dtype and device (a float's made once)."""
    if isinstance(value, Tensor):
        return value
    return _constant(value, like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-d tensor made once: the kernel reads it, nothing writes it."""
    return torch.full((), value, dtype=dtype, device=device)


# Measured on ResNet-50 and ViT-B/16 on CPU: tensors of up to 2^18 values update as fast
# eagerly, and 16 fp32 values fill one AVX-512 vector (two AVX2 ones).
_FUSED_MIN_NUMEL = 1 << 18
_LANES = 16
_MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _is_dense(tensor: Tensor) -> bool:
    """Whether the tensor's elements fill one gap-free block of memory (any memory format)."""
    return any(tensor.is_contiguous(memory_format=f) for f in _MEMORY_FORMATS)


def _rows(tensor: Tensor) -> Tensor:
    """A dense tensor's memory, in memory order, as rows of ``_LANES`` values; detached, so
    that the graph's guards need not check the bases these views come from."""
    shape = (tensor.numel() // _LANES, _LANES)
    return tensor.as_strided(shape, (_LANES, 1), tensor.storage_offset()).detach()


def _single_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    eta: float,
    epsilon: float,
    adapted: int,
    decays: float | list[float],
    trust_clip: bool,
    nesterov: bool,
    on_update: bool,
    lr_in_buffer: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    update_: Callable[..., None] = _tensor_update_,
) -> Tensor | None:
    """One parameter at a time: each tensor's update runs while it is still in cache, which
    makes this the faster path on CPU. The ratios of the bucket are computed together;
    ``update_`` updates one tensor (eager, or compiled for the fused path)."""
    overflow = _overflow(found_inf, momentum, params[0])
    if grad_scale is not None:
        grads = [g / grad_scale for g in grads]
    if overflow is not None:
        # An overflowed gradient holds inf or nan, which no multiplication can zero out.
        grads = [torch.where(overflow.keep, g, 0.0) for g in grads]
    norms = None
    if adapted:
        # The ratio on the update takes each decayed gradient's norm as it is made, so that no
        # more than one tensor's temporary is alive.
        pairs = zip(params[:adapted], grads[:adapted])
        denoms = (
            [_norm(_decayed_grad(g, p, _item(decays, i))) for i, (p, g) in enumerate(pairs)]
            if on_update
            else [_norm(g) for g in grads[:adapted]]
        )
        norms = torch.stack([*(_norm(p) for p in params[:adapted]), *denoms])
    ratios, steps = _bucket_steps(
        norms,
        len(params),
        lr,
        weight_decay,
        eta,
        epsilon,
        trust_clip,
        on_update,
        lr_in_buffer,
        overflow,
    )
    decayed_steps = _decayed_steps(steps, decays)
    held = momentum if overflow is None else overflow.momentum
    update_scale = _update_scale(lr, lr_in_buffer, overflow)
    for index, (p, g, buf) in enumerate(zip(params, grads, bufs)):
        step, decayed_step = _item(steps, index), _item(decayed_steps, index)
        update_(p, g, buf, step, decayed_step, momentum, held, nesterov, update_scale)
    return ratios


def _norm(tensor: Tensor) -> Tensor:
    """The 2-norm, in float32 for half types. A dot product for contiguous float32 and float64
    tensors: on CPU twice as fast as ``vector_norm`` and closer to the float64 norm."""
    if tensor.dtype in (torch.float32, torch.float64) and tensor.is_contiguous():
        flat = tensor.view(-1)
        return torch.dot(flat, flat).sqrt_()
    return torch.linalg.vector_norm(tensor, dtype=_norm_dtype(tensor.dtype))


def _item(values: float | list[float] | list[Tensor] | None, index: int) -> Any:
    """Entry ``index`` of a per-tensor list, or the shared value."""
    return values[index] if isinstance(values, list) else values


def _multi_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    eta: float,
    epsilon: float,
    adapted: int,
    decays: float | list[float],
    trust_clip: bool,
    nesterov: bool,
    on_update: bool,
    lr_in_buffer: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    norm_group: Any = None,
) -> Tensor | None:
    overflow = _overflow(found_inf, momentum, params[0])
    if grad_scale is not None:
        grads = torch._foreach_div(grads, grad_scale.to(params[0].device))
    if overflow is not None:
        grads = [torch.where(overflow.keep, g, 0.0) for g in grads]
    norms = None
    if adapted:
        denoms = grads[:adapted]
        if on_update:
            denoms = _foreach_decayed_grads(denoms, params[:adapted], _head(decays, adapted))
        norms = _bucket_norms(params[:adapted], denoms, norm_group)
    ratios, steps = _bucket_steps(
        norms,
        len(params),
        lr,
        weight_decay,
        eta,
        epsilon,
        trust_clip,
        on_update,
        lr_in_buffer,
        overflow,
    )
    # buf = momentum * buf + step * g + step * decay * p: g + decay * p is never materialised,
    # since a temporary the size of the model costs more than the extra multiply-add.
    decayed_steps = _decayed_steps(steps, decays)
    torch._foreach_mul_(bufs, momentum if overflow is None else overflow.momentum)
    _foreach_add_scaled_(bufs, grads, steps)
    if decayed_steps is not None:
        _foreach_add_scaled_(bufs, params, decayed_steps)
    if nesterov:
        update = torch._foreach_mul(bufs, momentum)
        _foreach_add_scaled_(update, grads, steps)
        if decayed_steps is not None:
            _foreach_add_scaled_(update, params, decayed_steps)
    else:
        update = bufs
    update_scale = _update_scale(lr, lr_in_buffer, overflow)
    if isinstance(update_scale, Tensor):
        update = torch._foreach_mul(update, update_scale)
    if isinstance(update_scale, float):
        torch._foreach_add_(params, update, alpha=-update_scale)
    else:
        torch._foreach_sub_(params, update)
    return ratios


def _head(values: float | list[float], count: int) -> float | list[float]:
    """The first ``count`` entries of a per-tensor list, or the value they share (the adapted
    tensors usually all decay alike: one multi-tensor op instead of two)."""
    if not isinstance(values, list):
        return values
    head = values[:count]
    return head[0] if len(set(head)) == 1 else head


def _add_scaled_(out: Tensor, tensor: Tensor, scale: float | Tensor) -> None:
    """``out += scale * tensor`` for a float or a 0-d tensor ``scale``."""
    if isinstance(scale, Tensor):
        out.addcmul_(tensor, scale)
    else:
        out.add_(tensor, alpha=scale)


def _per_tensor(step_size: float | Tensor, count: int) -> float | list[Tensor]:
    """One float for the whole bucket, or one 0-d tensor per tensor."""
    if isinstance(step_size, float):
        return step_size
    if step_size.dim() == 0:
        step_size = step_size.expand(count)
    return list(step_size.unbind())


def _decayed_steps(
    steps: float | list[Tensor], decays: float | list[float]
) -> float | list[float] | list[Tensor] | None:
    """``step * decay`` per tensor; None when nothing is decayed."""
    if not decays:
        return None
    if isinstance(steps, float):
        return [steps * d for d in decays] if isinstance(decays, list) else steps * decays
    return list(torch._foreach_mul(steps, decays))


def _foreach_add_scaled_(
    outs: list[Tensor], tensors: list[Tensor], scales: float | list[float] | list[Tensor]
) -> None:
    """``out += scale * tensor`` for every pair: one float, a float each, or a 0-d tensor each."""
    if isinstance(scales, float):
        torch._foreach_add_(outs, tensors, alpha=scales)
    elif isinstance(scales[0], Tensor):
        torch._foreach_addcmul_(outs, tensors, scales)
    else:  # a float each: only a bucket of unadapted tensors with mixed decay, at a float lr
        torch._foreach_add_(outs, torch._foreach_mul(tensors, scales))


def _bucket_steps(
    norms: Tensor | None,
    count: int,
    lr: float | Tensor,
    weight_decay: float,
    eta: float,
    epsilon: float,
    trust_clip: bool,
    on_update: bool,
    lr_in_buffer: bool,
    overflow: _Overflow | None,
) -> tuple[Tensor | None, float | list[Tensor]]:
    """The applied ratios of the adapted tensors (from their weight norms followed by their
    gradient norms, or with ``on_update`` their decayed gradients' norms; None when none is
    adapted) and every tensor's step size into the buffer: its ratio, 1 past the adapted ones,
    times lr when it sits in the buffer, and 0 on a GradScaler overflow. The paper's ratio with
    the lr outside the buffer is apex's LARC (:func:`_larc_ratio`)."""
    ratios = None
    step_size: float | Tensor = lr if lr_in_buffer else 1.0
    if norms is not None:
        w_norms, denoms = norms.chunk(2)
        if on_update:
            ratios = _applied_ratio(_ratio_of_norms(w_norms, denoms, eta), lr, trust_clip)
        elif lr_in_buffer:
            ratio = _trust_ratio(w_norms, denoms, weight_decay, eta, epsilon)
            ratios = _applied_ratio(ratio, lr, trust_clip)
        else:
            ratios = _larc_ratio(w_norms, denoms, weight_decay, eta, epsilon, lr, trust_clip)
        step_size = F.pad(ratios, (0, count - len(ratios)), value=1.0)
        if lr_in_buffer:
            step_size = step_size * lr
    if overflow is not None:
        step_size = overflow.step_mask * step_size
    return ratios, _per_tensor(step_size, count)


def _bucket_norms(params: list[Tensor], grads: list[Tensor], norm_group: Any) -> Tensor:
    """The weight norms then the gradient norms, in one 1-d tensor; with ``norm_group`` the
    tensors are local shards, and one all-reduce of the squares gives the whole tensors'."""
    norm_dtype = _norm_dtype(params[0].dtype)
    norms = torch.stack(torch._foreach_norm([*params, *grads], 2, dtype=norm_dtype))
    if norm_group is not None:
        norms = norms.square_()
        dist.all_reduce(norms, group=norm_group)
        norms = norms.sqrt_()
    return norms


@functools.cache
def _compiled_multi_tensor_lars() -> Callable[..., Tensor | None]:
    """The multi-tensor update compiled once per process.

    Dynamo keeps one graph per bucket structure (list lengths, shapes, flags); the learning rate
    travels as a tensor, so a schedule never triggers a recompile.
    """
    return torch.compile(_multi_tensor_lars, fullgraph=True, dynamic=False)


@functools.cache
def _compiled_tensor_update() -> Callable[..., None]:
    """The per-tensor update compiled once per process for any number of rows (the callers
    mark that dimension dynamic): the fused path's first step on CPU compiles one small graph,
    not one per parameter shape."""
    return torch.compile(_tensor_update_, fullgraph=True)
