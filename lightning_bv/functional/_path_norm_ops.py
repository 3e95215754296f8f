"""The ops ``path_norm`` accepts on activations (an allow-list, by how each is rewritten) and pure tensor helpers.

Membership is by function identity. The helpers compute ``|t|^p`` and the window arithmetic of the pooling rules: a
max-pool's sum over its windows (:func:`_sum_pool`) and the sizes of an adaptive pool's windows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_T = torch.Tensor
# Ops on activations, by how they are rewritten. Membership is by function identity: an allow-list.
_GROUPS: dict[str, tuple[Callable, ...]] = {
    # entries are moved, copied, selected or summed with weight 1: run unchanged
    "move": (
        *(getattr(_T, n) for n in ("view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute")),
        *(getattr(_T, n) for n in ("transpose", "t", "squeeze", "unsqueeze", "contiguous", "expand", "expand_as")),
        *(getattr(_T, n) for n in ("__getitem__", "narrow", "select", "chunk", "split", "unbind", "movedim")),
        *(getattr(_T, n) for n in ("repeat", "flip", "clone", "sum")),
        *(getattr(torch, n) for n in ("flatten", "unflatten", "reshape", "permute", "transpose", "squeeze")),
        *(getattr(torch, n) for n in ("unsqueeze", "narrow", "select", "chunk", "split", "unbind", "movedim")),
        *(getattr(torch, n) for n in ("flip", "clone", "sum", "cat", "concat", "concatenate", "stack")),
    ),
    # the identity on a nonnegative input
    "identity": (F.relu, F.relu_, torch.relu, torch.relu_, _T.relu, _T.relu_, F.leaky_relu, F.leaky_relu_)
    + (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout),
    # input first, then weights and biases that must not depend on the input
    "weighted": (F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
    "add": (torch.add, _T.add, _T.add_, _T.__add__, _T.__radd__, _T.__iadd__),
    "sub": (torch.sub, torch.subtract, _T.sub, _T.sub_, _T.__sub__, _T.__isub__, torch.rsub, _T.__rsub__),
    "mul": (torch.mul, torch.multiply, _T.mul, _T.mul_, _T.__mul__, _T.__rmul__, _T.__imul__)
    + (torch.matmul, torch.mm, torch.bmm, _T.matmul, _T.mm, _T.bmm, _T.__matmul__, _T.__rmatmul__),
    "div": (torch.div, torch.true_divide, _T.div, _T.div_, _T.__truediv__, _T.__itruediv__),
    "mean": (torch.mean, _T.mean),
    "pad": (F.pad,),
    "batch_norm": (F.batch_norm,),
    "max_pool": (F.max_pool1d, F.max_pool2d, F.max_pool3d),
    "avg_pool": (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d),
    "adaptive_pool": (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
    + (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d),
}
_HANDLER = {f: group for group, funcs in _GROUPS.items() for f in funcs}
# methods and properties that read no values (ops like `item` or `__bool__` would let values steer the forward)
_METADATA = {
    *("size", "dim", "ndimension", "numel", "nelement", "stride", "__len__", "__hash__", "__repr__", "__format__"),
    *("is_contiguous", "is_floating_point", "is_complex", "is_signed", "element_size", "get_device", "data_ptr"),
    *("shape", "ndim", "dtype", "device", "layout", "requires_grad", "grad_fn", "is_leaf", "names", "itemsize"),
    *("is_cuda", "is_cpu", "is_meta", "is_mps", "is_xpu", "is_sparse", "is_quantized", "is_mkldnn", "is_nested"),
}
# metadata that a parameter and its float64 copy share: read on the parameter itself (no copy made for it)
_SHARED_METADATA = _METADATA - {"dtype", "element_size", "itemsize", "data_ptr", "grad_fn", "is_leaf"}
_SHARED_METADATA -= {"__hash__", "__repr__", "__format__"}
# weighted ops whose weight rows are output channels (built a block of rows at a time; not grouped or transposed)
_ROW_BLOCKED = (F.linear, F.conv1d, F.conv2d, F.conv3d)
_ARGS = {  # positional names of the ops whose arguments are read
    "max_pool": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "avg_pool": ("input", "kernel_size", "stride", "padding", "ceil_mode"),
    "adaptive_pool": ("input", "output_size"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    "pad": ("input", "pad", "mode", "value"),
}


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _abs_pow(t: Tensor, p: float) -> Tensor:
    """``|t|^p`` in one pass for the common p (a weight matrix is read once per path-norm)."""
    if p == 1:
        return t.abs()
    if p == 2:
        return t.square()
    return t.abs().pow(p)


def _abs_pow_f64(t: Tensor, p: float) -> Tensor:
    """``|t|^p`` in float64; of a lower precision ``t``, computed in place on its float64 copy (one allocation)."""
    if t.dtype == torch.float64:
        return _abs_pow(t, p)
    t = t.to(torch.float64)
    return t.abs_() if p == 1 else t.square_() if p == 2 else t.abs_().pow_(p)


def _name(func: Callable) -> str:
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":  # a property such as Tensor.shape or Tensor.T
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _bind(group: str, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(_ARGS[group], args, strict=False))
    bound.update(kwargs)
    return bound


def _is_inplace(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i")


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, Sequence) else (value,)
    return values * n if len(values) == 1 else values


def _sum_pool(x: Tensor, n: int, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool) -> Tensor:
    """Sum of ``x`` over the windows of an ``n``-d max-pool (same output shape), as a convolution with ones."""
    ks, ss = _tuple(kernel, n), _tuple(stride or kernel, n)
    ps, ds = _tuple(padding, n), _tuple(dilation, n)
    spatial = x.shape[-n:]
    pads: list[int] = []
    for size, k, s, p, d in zip(spatial, ks, ss, ps, ds, strict=True):
        span, room = d * (k - 1) + 1, size + 2 * p
        out = (-(-(room - span) // s) if ceil_mode else (room - span) // s) + 1
        if ceil_mode and (out - 1) * s >= size + p:  # torch drops a last window that starts in the right padding
            out -= 1
        pads = [p, p + max(0, (out - 1) * s + span - room), *pads]  # F.pad lists the last dimension first
    ones = torch.ones((1, 1, *ks), dtype=x.dtype, device=x.device)
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    y = conv(F.pad(x.reshape(-1, 1, *spatial), pads), ones, stride=ss, dilation=ds)
    return y.reshape(*x.shape[:-n], *y.shape[-n:])


def _adaptive_window_sizes(spatial: Sequence[int], output_size: Any, like: Tensor) -> Tensor:
    """Count the entries in each window of an adaptive pool, shaped like its spatial output."""
    sizes = torch.ones((), dtype=like.dtype, device=like.device)
    for size, out in zip(spatial, _tuple(output_size, len(spatial)), strict=True):
        out = size if out is None else out
        lengths = [-(-(i + 1) * size // out) - (i * size) // out for i in range(out)]
        sizes = sizes.unsqueeze(-1) * torch.tensor(lengths, dtype=like.dtype, device=like.device)
    return sizes
