"""The :class:`~torch.overrides.TorchFunctionMode` of ``path_norm``: it follows which tensors carry activations.

It rewrites every op on activations into its ``|.|^p`` version (the rules of the allow-list in
:mod:`lightning_bv.functional._path_norm_ops`), runs computations on parameters alone on float64 copies of them, reads
the weight of a Linear/Conv layer one block of rows at a time, and refuses any other op, naming it and its module.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from lightning_bv.functional._path_norm_ops import (
    _HANDLER,
    _METADATA,
    _ROW_BLOCKED,
    _SHARED_METADATA,
    _abs_pow,
    _abs_pow_f64,
    _adaptive_window_sizes,
    _arg,
    _bind,
    _is_inplace,
    _name,
    _sum_pool,
    _tensors,
)

# entries of a CPU weight's |W|^p built at once in float64: 256 KiB stay in cache while they are read, and torch runs
# an op on at most 32768 entries in one thread (no wait for a second thread that another process may be holding)
_BLOCK = 1 << 15


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
