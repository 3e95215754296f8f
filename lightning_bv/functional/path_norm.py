"""Whole-network l_p path-norm (Neyshabur et al., 2015; Gonon et al., ICLR 2024), in one forward pass.

The path-norm is the sum, over every path from an input coordinate (or from a bias) to an output, of the product of
``|weight|^p`` along the path, to the power ``1/p``. It equals the output sum of the network whose weights and biases
are replaced by ``|.|^p`` (BatchNorm folded first, max-pools replaced by sums over their windows, average-pools by
sums times ``(1/window)^p``) evaluated on an all-ones input, where every ReLU is the identity.

The model's own ``forward`` runs under :func:`torch.func.functional_call` on float64 copies of its buffers. A
:class:`~torch.overrides.TorchFunctionMode` follows which tensors carry activations and rewrites the ops that touch
them; computations on parameters alone (parametrizations, low-rank products) run unchanged on float64 copies of the
parameters, so the norm is that of the effective weights. On CPU the weight of a Linear/Conv layer read directly is
not copied whole: its ``|W|^p`` is built in float64 one block of rows at a time, each block used while it is in cache
(a fresh float64 copy of a large weight costs more than the product itself, mostly in page faults). Any op on
activations outside an allow-list is refused, naming the op and the module. Forward hooks mark the module each op
runs in and switch BatchNorm modules to their eval branch for the length of their own call (restored on exit, also
on errors), so training mode needs no special care.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from lightning_bv._trace import force_eager

__all__ = ["path_norm"]

_T = torch.Tensor
# entries of a CPU weight's |W|^p built at once in float64: 256 KiB stay in cache while they are read, and torch runs
# an op on at most 32768 entries in one thread (no wait for a second thread that another process may be holding)
_BLOCK = 1 << 15
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


class _PathNormMode(TorchFunctionMode):
    """Rewrites the ops on activations (tensors that depend on the all-ones input) into their ``|.|^p`` version."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.module_stack: list[tuple[str, nn.Module, bool]] = []
        self._acts: set[int] = set()
        self._alive: list[Tensor] = []  # keeps the ids in _acts (and _tokens) from being reused
        self._tokens: set[int] = set()  # integer inputs (token ids) and their views
        self._params: set[int] = set()  # ids of the floating-point parameters not in float64 (the model holds them)
        self._copies: dict[int, Tensor] = {}  # their float64 copies, made on first use by a computation

    def watch_params(self, params: Sequence[Tensor]) -> None:
        self._params.update(id(t) for t in params if t.is_floating_point() and t.dtype != torch.float64)

    def f64(self, t: Tensor) -> Tensor:
        """``t`` in float64; a parameter's copy is made once, so all its uses (in-place ones too) see one tensor."""
        if id(t) not in self._params:
            return t.to(torch.float64)
        copy = self._copies.get(id(t))
        if copy is None:
            copy = self._copies[id(t)] = t.to(torch.float64)
        return copy

    def copies(self, obj: Any) -> Any:
        """``obj`` with every parameter replaced by its float64 copy (containers rebuilt, other values unchanged)."""
        if isinstance(obj, Tensor):
            return self.f64(obj) if id(obj) in self._params else obj
        if type(obj) in (list, tuple):
            return type(obj)(self.copies(v) for v in obj)
        if isinstance(obj, dict):
            return {k: self.copies(v) for k, v in obj.items()}
        return obj

    def row_blocks(self, w: Tensor) -> Iterator[Tensor]:
        """``|w|^p`` in float64, one block of rows (about ``_BLOCK`` entries) after the other.

        Each block is to be used before the next is asked for. On CPU, without autograd, every block is written into
        one reused buffer: a fresh allocation of this size can cost page faults each time (glibc gives it back to the
        system when it is freed). Off CPU (one kernel per block would cost more than the copy) and for a tensor
        subclass such as a DTensor the whole comes at once.
        """
        w = self._copies.get(id(w), w)  # the copy a computation on parameters made (it may have changed it in place)
        if type(w) not in (Tensor, nn.Parameter) or w.device.type != "cpu" or w.numel() <= _BLOCK:
            yield _abs_pow_f64(w, self.p)
            return
        rows = max(1, _BLOCK // max(1, w[0].numel()))
        if torch.is_grad_enabled():  # backward may keep every block (also of a frozen weight): no buffer to reuse
            for block in w.split(rows):
                yield _abs_pow_f64(block, self.p)
            return
        buffer = torch.empty((rows, *w.shape[1:]), dtype=torch.float64, device=w.device)
        for block in w.split(rows):
            out = buffer if block.shape[0] == rows else buffer[: block.shape[0]]
            out.copy_(block)
            yield out.abs_() if self.p == 1 else out.square_() if self.p == 2 else out.abs_().pow_(self.p)

    def mark_tokens(self, obj: Any) -> None:
        for t in _tensors(obj):
            self._tokens.add(id(t))
            self._alive.append(t)

    def _token_op(self, func: Callable, name: str, args: Sequence[Any], kwargs: dict) -> Any:
        """An op reading token ids: an embedding starts paths; views of the ids stay ids; others give constants."""
        if func in (F.embedding, torch.embedding) and isinstance(args[0], Tensor) and id(args[0]) in self._tokens:
            b = inspect.signature(F.embedding).bind(*args, **kwargs).arguments if func is F.embedding else {}
            if b.get("max_norm") is not None:
                raise self.refuse("`embedding` with max_norm (it renormalizes its weight in place)")
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            ids = args[0]
            # an embedding is a Linear on the one-hot token: all-ones input -> the column sums of |E|^p at each position
            sums = [block.sum(0) for block in self.row_blocks(weight)]
            row = sums[0] if len(sums) == 1 else torch.stack(sums).sum(0)
            out = row.expand(*ids.shape, row.shape[0]).clone()
            self.mark(out)
            return out
        where = f" in module '{self.module_stack[-1][0] or '<root>'}'" if self.module_stack else ""
        wrong = ValueError(
            "`example_input` must be a floating-point tensor, or integer token ids that the model reads with an "
            f"embedding (nn.Embedding); `{name}`{where} reads the integer input instead"
        )
        try:
            out = func(*args, **kwargs)
        except (RuntimeError, TypeError) as err:
            raise wrong from err
        results = list(_tensors(out))
        if _HANDLER.get(func) == "move" and results and all(not t.is_floating_point() for t in results):
            self.mark_tokens(out)
        elif any(t.is_floating_point() for t in results):
            raise wrong
        return out

    def enter_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.module_stack.append((name, module, module.training))
            if isinstance(module, _BatchNorm):  # its eval branch: running statistics, no update, no SyncBN collective
                module.training = False

        return hook

    def exit_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.module_stack and self.module_stack[-1][1] is module:
            module.training = self.module_stack.pop()[2]

    def mark(self, obj: Any) -> None:
        for t in _tensors(obj):
            if id(t) not in self._acts:
                self._acts.add(id(t))
                self._alive.append(t)

    def is_act(self, obj: Any) -> bool:
        return isinstance(obj, Tensor) and id(obj) in self._acts

    def refuse(self, what: str) -> NotImplementedError:
        where = "the root module"
        if self.module_stack:
            name, module, _ = self.module_stack[-1]
            where = f"module '{name or '<root>'}' ({type(module).__name__})"
        return NotImplementedError(
            f"path_norm does not support {what} in {where}. Supported on activations: Linear/Conv layers, "
            "BatchNorm (folded with its running statistics), ReLU/LeakyReLU, Dropout, max/avg/adaptive pooling, "
            "additions, products with constants, concatenation and reshaping."
        )

    def lift(self, value: Any, numbers: bool) -> Any:
        """``|value|^p`` for a constant tensor (or a number when ``numbers``); activations pass unchanged."""
        if isinstance(value, Tensor):
            if self.is_act(value) or not (numbers or value.is_floating_point()):
                return value
            return _abs_pow(self.f64(value), self.p)
        if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            return abs(value) ** self.p
        if type(value) in (list, tuple):
            return type(value)(self.lift(v, numbers) for v in value)
        return value

    def __torch_function__(self, func: Callable, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self._tokens and any(id(t) in self._tokens for t in _tensors((args, kwargs))):
            return self._token_op(func, getattr(func, "__name__", repr(func)), args, kwargs)
        tensors = list(_tensors((args, kwargs)))
        if not any(self.is_act(t) for t in tensors):  # parameters and constants only: run on float64 parameters
            if any(id(t) in self._params for t in tensors) and _name(func) not in _SHARED_METADATA:
                args, kwargs = self.copies(args), self.copies(kwargs)
            return func(*args, **kwargs)
        name = _name(func)
        group = _HANDLER.get(func)
        if group is None:
            if name in _METADATA:
                return func(*args, **kwargs)
            raise self.refuse(f"`{name}`")
        if _is_inplace(name) and not self.is_act(args[0]):
            raise self.refuse(f"the in-place `{name}` writing an activation into a constant")
        out = getattr(self, "_" + group)(func, name, list(args), kwargs)
        self.mark(out)
        return out

    def _move(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        return func(*self.lift(args, False), **self.lift(kwargs, False))

    def _identity(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        try:
            inplace = inspect.signature(func).bind(*args, **kwargs).arguments.get("inplace", False)
        except (TypeError, ValueError):  # a builtin such as torch.relu_
            inplace = False
        return args[0] if inplace or _is_inplace(name) else args[0].clone()

    def _weighted(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        if not self.is_act(args[0]) or any(self.is_act(t) for t in _tensors((args[1:], kwargs))):
            raise self.refuse(f"`{name}` with weights that depend on the input")
        x, weight, bias = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        blockable = isinstance(weight, Tensor) and weight.dim() >= 2 and _arg(args, kwargs, 6, "groups", 1) == 1
        if func not in _ROW_BLOCKED or not blockable:
            return func(x, *self.lift(args[1:], False), **self.lift(kwargs, False))
        # rows are output channels: |W|^p one block of rows at a time, never the whole float64 copy of a large weight
        bias = self.lift(bias, False)
        rest, options = self.lift(args[3:], False), self.lift({k: v for k, v in kwargs.items() if k != "bias"}, False)
        options.pop("weight", None)
        outs, start = [], 0
        for block in self.row_blocks(weight):
            part = None if bias is None else bias[start : start + block.shape[0]]
            outs.append(func(x, block, part, *rest, **options))
            start += block.shape[0]
        channels = -1 if func is F.linear else x.dim() - weight.dim() + 1  # conv: 1 on a batch, 0 on one sample
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=channels)

    def _add(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        return func(*self.lift(args, True), **self.lift(kwargs, True))

    def _sub(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        # a - alpha * b has the paths of a + |alpha| * b; rsub(a, b) is b - alpha * a
        a, b = (args[1], args[0]) if "rsub" in name else (args[0], args[1])
        alpha = self.lift(kwargs.get("alpha", 1), True)
        if _is_inplace(name):
            return a.add_(self.lift(b, True), alpha=alpha)
        return self.lift(a, True) + alpha * self.lift(b, True)

    def _mul(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        if self.is_act(args[0]) == self.is_act(args[1]):
            raise self.refuse(f"`{name}` of two activations (only products with constants are linear)")
        return func(*self.lift(args, True), **kwargs)

    def _div(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        if not self.is_act(args[0]) or self.is_act(args[1]) or kwargs.get("rounding_mode") is not None:
            raise self.refuse(f"`{name}` other than an activation divided by a constant")
        return func(args[0], self.lift(args[1], True), **kwargs)  # x / |c|^p = x * |1/c|^p

    def _mean(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        out = func(*args, **kwargs)  # a mean is a sum with weights 1/n: its |.|^p is the sum times n^-p
        return out * (args[0].numel() / out.numel()) ** (1 - self.p)

    def _pad(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        bound = _bind("pad", args, kwargs)
        mode = bound.get("mode", "constant")  # reflect/replicate/circular copy entries: weight 1
        value = self.lift(bound.get("value") or 0.0, True) if mode == "constant" else None  # like a bias
        return F.pad(bound["input"], bound["pad"], mode, value)

    def _batch_norm(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        bn = self.copies(_bind("batch_norm", args, kwargs))
        x, mean, var = bn["input"], bn["running_mean"], bn["running_var"]
        if mean is None or var is None:
            raise self.refuse("BatchNorm without running statistics (track_running_stats=False)")
        if not self.is_act(x) or any(self.is_act(bn.get(k)) for k in ("running_mean", "running_var", "weight", "bias")):
            raise self.refuse("`batch_norm` with statistics or weights that depend on the input")
        scale = var.to(torch.float64).add(bn.get("eps", 1e-5)).rsqrt()
        if bn.get("weight") is not None:
            scale = scale * bn["weight"]
        shift = -mean * scale if bn.get("bias") is None else bn["bias"] - mean * scale
        shape = (-1,) + (1,) * (x.dim() - 2)  # channels on dimension 1
        return x * _abs_pow(scale, self.p).reshape(shape) + _abs_pow(shift, self.p).reshape(shape)

    def _max_pool(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        b = _bind("max_pool", args, kwargs)  # return_indices=True dispatches to `max_pool*_with_indices`: refused
        geometry = (b["kernel_size"], b.get("stride"), b.get("padding", 0), b.get("dilation", 1))
        return _sum_pool(b["input"], int(name[-2]), *geometry, bool(b.get("ceil_mode")))

    def _avg_pool(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        # window w holds n_w entries of weight 1/d_w: compute sum * d_w^-p = avg * d_w^(1-p) with d_w = n_w / avg(1)
        b, n = _bind("avg_pool", args, kwargs), int(name[-2])
        x, out = b["input"], func(*args, **kwargs)
        ones = torch.ones((1, 1, *x.shape[-n:]), dtype=x.dtype, device=x.device)
        geometry = (b["kernel_size"], b.get("stride"), b.get("padding", 0), 1, bool(b.get("ceil_mode")))
        divisors = _sum_pool(ones, n, *geometry) / func(ones, *args[1:], **kwargs)
        return out * divisors.reshape(out.shape[-n:]).pow(1 - self.p)

    def _adaptive_pool(self, func: Callable, name: str, args: list, kwargs: dict) -> Any:
        b, n = _bind("adaptive_pool", args, kwargs), int(name[-2])
        x = b["input"]
        sizes = _adaptive_window_sizes(x.shape[-n:], b["output_size"], x)
        avg = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[n - 1](x, b["output_size"])
        return avg * (sizes if "max" in name else sizes.pow(1 - self.p))  # max: sum over the window


def path_norm(model: nn.Module, example_input: Tensor | tuple | Mapping[str, Any], p: float = 1) -> Tensor:
    r"""Whole-network :math:`\ell_p` path-norm of ``model``, differentiable with respect to its parameters.

    The sum over all input-output paths of :math:`\prod |w|^p` (a bias starts a path at its neuron), to the power
    :math:`1/p`, computed in one forward pass of the model's own ``forward`` on float64 copies of ``|theta|^p`` and
    an all-ones input: BatchNorm is folded into an affine map with its running statistics, max-pools become sums over
    their windows, average pools sums times ``(1/window)^p``, ReLU, LeakyReLU and Dropout the identity. Skip
    connections and concatenations need nothing. The model is not modified and may be in training mode.

    Args:
        model: a network built from Linear/Conv layers, BatchNorm, ReLU/LeakyReLU, Dropout, pooling, additions,
            concatenation and reshaping. Any other op on activations raises ``NotImplementedError`` naming the op
            and the module it ran in.
        example_input: an input batch, a tuple of positional inputs or a dict of keyword inputs (``model(**d)``) of
            the model; only the shapes of its floating-point tensors after the batch dimension are used. Integer
            tensors are token ids: the embedding that reads them is a Linear on the one-hot token, so every token of
            the vocabulary starts paths (the model's own ids only give the sequence length).
        p: the exponent, a finite number ``>= 1``.

    Returns:
        A float64 scalar tensor that carries gradients to the model's parameters (usable as a penalty).

    Note:
        BatchNorm is its own affine layer ``x -> scale * x + shift`` (``scale = gamma / sqrt(running_var + eps)``,
        ``shift = beta - running_mean * scale``): a bias of the layer before it and ``shift`` are two biases. This
        equals folding BatchNorm into a bias-free layer before it, as in ResNets. A constant ``c`` added to an
        activation counts like a bias ``|c|^p``; user forward hooks of the model run during the computation.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(1.0), net[0].bias.fill_(0.5), net[2].weight.fill_(-2.0), net[2].bias.fill_(1.0)
        >>> path_norm(net, torch.randn(8, 2), p=1).item()  # 3 neurons * 2 * (2 * 1 + 0.5) + 1
        16.0
        >>> round(path_norm(net, torch.randn(8, 2), p=2).item() ** 2, 6)  # 3 * 4 * (2 * 1 + 0.25) + 1
        28.0

    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 1:
        raise ValueError(f"`p` must be a finite number >= 1, got {p!r}")
    if isinstance(example_input, Mapping):
        keys, inputs = list(example_input), tuple(example_input.values())
    else:
        keys, inputs = None, example_input if isinstance(example_input, tuple) else (example_input,)

    def start(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if t.is_floating_point():
            return torch.ones((1, *t.shape[1:]), dtype=torch.float64, device=t.device)
        return t[:1].clone() if t.dim() > 0 and not t.dtype.is_complex and t.dtype != torch.bool else t

    ones = tuple(start(t) for t in inputs)
    starts = [t for t, x in zip(ones, inputs, strict=True) if t is not x and t.is_floating_point()]  # all-ones
    tokens = [t for t, x in zip(ones, inputs, strict=True) if t is not x and not t.is_floating_point()]
    if not starts and not tokens:
        raise ValueError(
            "`example_input` must be a floating-point tensor, or integer token ids, or a tuple or dict holding one"
        )
    state = {}  # parameters stay the model's own (the mode reads them in float64); buffers are float64 copies
    for k, v in model.named_buffers():  # copies: a forward in training mode may update buffers in place
        state[k] = v.detach().to(torch.float64 if v.is_floating_point() else v.dtype, copy=True)

    mode = _PathNormMode(p)
    mode.watch_params(list(model.parameters()))
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(mode.enter_hook(name)))
        handles.append(module.register_forward_hook(mode.exit_hook, always_call=True))
    device = (starts + tokens)[0].device.type  # mixed precision would round the float64 computation
    no_autocast = torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext()
    mode.mark(starts)
    mode.mark_tokens(tokens)
    args, kwargs = (ones, {}) if keys is None else ((), dict(zip(keys, ones)))
    try:
        with mode, no_autocast, force_eager():  # compiled code would trace the mode (slow; see _trace.force_eager)
            out = torch.func.functional_call(model, state, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    sums = [t.sum() for t in _tensors(out) if mode.is_act(t)]
    if not sums:
        raise ValueError("the model's output does not depend on its input, so it has no input-output paths")
    return torch.stack(sums).sum().pow(1 / p)
