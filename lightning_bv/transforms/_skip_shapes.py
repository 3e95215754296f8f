"""The shapes of a skip connection: sizing the affine skip around a module, and the checks that it fits.

:func:`~lightning_bv.transforms.skip.affine_skip_for` sizes a skip from a Linear/Conv layer, from the first and last
Linear/Conv layers of an ``nn.Sequential`` (:func:`_sequential_sizes`), or from the shapes one trial forward pass
records (:func:`shape_hooks`, :func:`_trial_shapes`); the checks here refuse a skip whose output shape would not match.
"""

from __future__ import annotations

from typing import Any, Optional, cast

import torch
from torch import Tensor, nn

from lightning_bv._layers import CONVS as _CONVS
from lightning_bv._select import show

_SizedSeq = tuple[str, int, int, tuple[int, ...], tuple[int, ...], int]  # kind, in, out, stride, padding, dims
_SHAPE_KEEPING = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ReLU6,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


def _leaves(module: nn.Module) -> list[nn.Module] | None:
    """The layers of a (nested) nn.Sequential in call order; None when some child is not a plain layer."""
    out: list[nn.Module] = []
    for child in module.children():
        if type(child) is nn.Sequential:
            inner = _leaves(child)
            if inner is None:
                return None
            out += inner
        elif isinstance(child, (nn.Linear, *_CONVS, *_POOLS, *_SHAPE_KEEPING)):
            out.append(child)
        else:
            return None
    return out


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * dims


def _sequential_sizes(module: nn.Module, name: str) -> _SizedSeq | None:
    """The sizes of a skip around an nn.Sequential, from its first and last Linear/Conv layers; None if unknown.

    A chain of convolutions (and pooling) maps a length ``L`` to ``floor((L + 2P - 1) / S) + 1`` at every ``L``, like
    one kernel-1 convolution of stride ``S`` and padding ``P``, when every layer's padding ``p`` and kernel ``k``
    (dilation ``d``) leave an integer ``p - d (k - 1) / 2 >= 0``; then ``S`` is the product of the strides and ``P``
    adds each layer's extra padding times the stride before it. Other chains raise with the layer named.
    """
    if not isinstance(module, nn.Sequential):
        return None
    layers = _leaves(module)
    sized = [m for m in layers or [] if isinstance(m, (nn.Linear, *_CONVS))]
    if layers is None or not sized:
        return None
    first, last = sized[0], sized[-1]
    if isinstance(first, nn.Linear) and isinstance(last, nn.Linear):
        if any(isinstance(m, (*_CONVS, *_POOLS)) for m in layers):
            return None
        return ("linear", int(first.in_features), int(last.out_features), (), (), 0)
    kinds = {_conv_dims(m) for m in sized}
    if len(kinds) != 1 or 0 in kinds:
        raise ValueError(
            f"A skip around {show(name)} cannot be sized from its layers: it mixes Linear and Conv layers "
            f"({', '.join(type(m).__name__ for m in sized)}), so its input and output are not one kind of features. "
            "Put the skip around a block of one kind."
        )
    dims = kinds.pop()
    stride, padding = [1] * dims, [0] * dims
    for m in layers or []:
        if not isinstance(m, (*_CONVS, *_POOLS)):
            continue
        extra = _extra_padding(m, dims)
        if extra is None or (isinstance(m, _POOLS) and getattr(m, "ceil_mode", False)):
            raise ValueError(
                f"A skip around {show(name)} cannot match its output size at every input size: its layer "
                f"{type(m).__name__}(kernel_size={m.kernel_size}, stride={m.stride}, padding={m.padding}) changes "
                "the size in a way no kernel-1 convolution does (it needs padding >= dilation * (kernel_size - 1) "
                "/ 2, a whole number, and ceil_mode=False). Put the skip around the block without that layer."
            )
        s = _tuple(m.stride if m.stride is not None else m.kernel_size, dims)
        for i in range(dims):
            padding[i] += extra[i] * stride[i]
            stride[i] *= s[i]
    return (
        "conv",
        int(cast(Any, first).in_channels),
        int(cast(Any, last).out_channels),
        tuple(stride),
        tuple(padding),
        dims,
    )


def _conv_dims(m: nn.Module) -> int:
    return next((i + 1 for i, c in enumerate(_CONVS) if isinstance(m, c)), 0)


def _extra_padding(m: Any, dims: int) -> tuple[int, ...] | None:
    """``p - d (k - 1) / 2`` per dimension for a conv or pool layer; None when negative or not a whole number."""
    k = _tuple(m.kernel_size, dims)
    d = _tuple(getattr(m, "dilation", 1), dims)
    if m.padding == "same":
        return (0,) * dims
    p = (0,) * dims if m.padding == "valid" else _tuple(m.padding, dims)
    twice = [2 * p[i] - d[i] * (k[i] - 1) for i in range(dims)]
    if any(t < 0 or t % 2 for t in twice):
        return None
    return tuple(t // 2 for t in twice)


def _skip_from_sizes(sized: _SizedSeq, kw: dict[str, Any]) -> nn.Module:
    kind, d_in, d_out, stride, padding, dims = sized
    if kind == "linear":
        return nn.Linear(d_in, d_out, **kw)
    conv: Any = _CONVS[dims - 1]
    return cast(nn.Module, conv(d_in, d_out, 1, stride=stride, padding=padding, **kw))


def _first_conv(module: nn.Module) -> Any:
    return next((m for m in module.modules() if isinstance(m, _CONVS)), None)


def _channel_skip_from_shapes(module: nn.Module, name: str, shape: tuple[Any, Any], kw: dict[str, Any]) -> nn.Module:
    """A kernel-1 conv from channels ``shape[0][1]`` to ``shape[1][1]``, strided to the trial's output size."""
    d_in, d_out = tuple(shape[0]), tuple(shape[1])
    dims = len(d_in) - 2
    if len(d_out) != len(d_in) or not 1 <= dims <= 3:
        raise ValueError(
            f"A skip around {show(name)} ({type(module).__name__}) would map channels, but it maps shape {d_in} to "
            f"{d_out}: a channel skip needs (N, C, ...) in and out with the same number of dimensions"
        )
    stride = tuple(-(-d_in[2 + i] // max(d_out[2 + i], 1)) for i in range(dims))
    return _CONVS[dims - 1](int(d_in[1]), int(d_out[1]), 1, stride=stride, **kw)


def _check_identity(module: nn.Module, name: str, shape: Optional[tuple[Any, Any]]) -> None:
    if isinstance(module, _CONVS):
        if module.in_channels != module.out_channels or any(s != 1 for s in module.stride):
            raise ValueError(
                f'kind="identity" needs {show(name)} to keep its input shape, but it maps {module.in_channels} to '
                f'{module.out_channels} channels with stride {module.stride}. Use kind="affine".'
            )
        _check_same_shape_padding(module, name)
        return
    sized = _sequential_sizes(module, name) if shape is None else None
    if sized is not None:
        if sized[1] != sized[2] or any(st != 1 for st in sized[3]) or any(sized[4]):
            raise ValueError(
                f'kind="identity" needs {show(name)} to keep its input shape, but it maps {sized[1]} to {sized[2]} '
                f"{'features' if sized[0] == 'linear' else 'channels'} (stride {sized[3]}, padding {sized[4]}). "
                'Use kind="affine".'
            )
        return
    if shape is not None:
        if tuple(shape[0]) != tuple(shape[1]):
            raise ValueError(
                f'kind="identity" needs {show(name)} to keep its input shape, but it maps {tuple(shape[0])} to '
                f'{tuple(shape[1])}. Use kind="affine".'
            )
        return
    d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if not (isinstance(d_in, int) and isinstance(d_out, int)):
        raise TypeError(
            f"Cannot read the input and output sizes of {show(name)} ({type(module).__name__}); pass `example_input=`"
        )
    if d_in != d_out:
        raise ValueError(
            f'kind="identity" needs {show(name)} to keep its input shape, but it maps {d_in} to {d_out} features. '
            'Use kind="affine".'
        )


def _same_shape_padding(module: Any) -> bool:
    """Return whether a kernel-1 conv with ``module``'s stride matches its output length (iff 2p = d(k-1))."""
    if module.padding == "same":
        return True
    padding = (0,) * len(module.kernel_size) if module.padding == "valid" else module.padding
    k, d = module.kernel_size, module.dilation
    return all(2 * padding[i] == d[i] * (k[i] - 1) for i in range(len(k)))


def _check_same_shape_padding(module: Any, name: str) -> None:
    if not _same_shape_padding(module):
        raise ValueError(
            f"A skip around {show(name)} ({type(module).__name__}, kernel_size={module.kernel_size}, "
            f"padding={module.padding}, dilation={module.dilation}) would not match its output shape: a skip "
            "needs padding = dilation * (kernel_size - 1) / 2 in every dimension (odd kernels)."
        )


def shape_hooks(targets: dict[str, nn.Module], seen: dict[str, tuple[Any, Any]]) -> list[Any]:
    """Forward hooks that record each target's first ``(input shape, output shape)`` in ``seen`` (one tensor each).

    Returns the handles; remove them when done.
    """

    def record(name: str) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if name not in seen and len(args) == 1 and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                seen[name] = (tuple(args[0].shape), tuple(output.shape))

        return hook

    return [module.register_forward_hook(record(name)) for name, module in targets.items()]


def _trial_shapes(model: nn.Module, targets: dict[str, nn.Module], example_input: Any) -> dict[str, tuple[Any, Any]]:
    """Run ``model(example_input)`` once (eval mode, no grad) and record each target's input and output shapes."""
    if example_input is None:
        return {}
    seen: dict[str, tuple[Any, Any]] = {}
    handles = shape_hooks(targets, seen)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes:
            m.training = mode
    for name in targets:
        if name not in seen:
            raise ValueError(
                f"{show(name)} was not called with one tensor returning one tensor during `model(example_input)`; "
                "a skip connection cannot be put around it"
            )
    return seen


def _check_skip_shape(name: str, skip: nn.Module, shape: tuple[Any, Any]) -> None:
    d_in, d_out = shape
    p = next(skip.parameters(), None)
    if p is None:
        got = tuple(d_in)
    else:
        with torch.no_grad():
            got = tuple(skip(torch.zeros(d_in, dtype=p.dtype, device=p.device)).shape)
    if got != tuple(d_out):
        raise ValueError(
            f"A skip around {show(name)} would give shape {got} for input shape {tuple(d_in)}, but the module gives "
            f"{tuple(d_out)}. The skip maps the last dimension (features) of a generic module, or the channels of a "
            "Linear/Conv layer."
        )


def _factory_kwargs(module: nn.Module) -> dict[str, Any]:
    p = next(module.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}
