"""Skip connections: :func:`add_skip`, :func:`is_skip`, :func:`remove_skip`.

THEORY.md section 5: a block of the representer theorem is ``z -> V relu(W z - b) + C z + c``; the affine term
``C z + c`` is the null space of the R-BV^2 seminorm and is not regularized. :func:`add_skip` wraps a module ``f`` in
:class:`AffineSkip`, which computes ``f(x) + skip(x)``. The affine ``skip`` starts at zero, so the model computes the
same function right after insertion, and it is marked as a skip path (``NullSpace``): neuron discovery never charges it
with the path-norm penalty but rescales it with the neurons it reads.

The wrapper replaces ``f`` in its parent under the same attribute name, so state_dict keys move: ``fc.weight`` becomes
``fc.module.weight``, next to ``fc.skip.weight`` and ``fc.skip.bias``. Do the surgery before building the optimizer
and before loading a checkpoint saved after it.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(3, 4)
    >>> y = model(x)
    >>> model = add_skip(model, ["2"])
    >>> is_skip(model[2]), torch.equal(model(x), y)
    (True, True)
    >>> model = remove_skip(model)
    >>> type(model[2]).__name__
    'Linear'

"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_bv._layers import CONVS as _CONVS
from lightning_bv._layers import is_null_space, null_space
from lightning_bv._select import named_modules, select_names, show

_KINDS = ("affine", "identity")


class AffineSkip(nn.Module):
    """``x -> module(x) + skip(x)``: a module with a skip connection around it.

    Args:
        module: the wrapped module ``f``.
        skip: the skip path: an affine layer marked as a skip path (see :func:`affine_skip_for`) or
            :class:`nn.Identity`.

    Example:
        >>> block = AffineSkip(nn.Linear(3, 3), nn.Identity())
        >>> x = torch.randn(2, 3)
        >>> torch.allclose(block(x), block.module(x) + x)
        True

    """

    def __init__(self, module: nn.Module, skip: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.skip = skip

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x) + self.skip(x)


def is_skip(module: nn.Module) -> bool:
    """Return whether ``module`` is an :class:`AffineSkip` wrapper (added by :func:`add_skip`).

    Example:
        >>> is_skip(nn.Linear(2, 2)), is_skip(add_skip(nn.Linear(2, 2), [""]))
        (False, True)

    """
    return isinstance(module, AffineSkip)


def add_skip(
    model: nn.Module,
    targets: Union[str, Sequence[str]],
    kind: str = "affine",
    exclude: Union[str, Sequence[str], None] = None,
    example_input: Any = None,
) -> nn.Module:
    """Wrap each targeted module ``f`` in :class:`AffineSkip`, computing ``f(x) + skip(x)``.

    ``kind="affine"``: ``skip`` is ``Linear(in, out)`` for a Linear ``f`` (or any module with ``in_features`` and
    ``out_features``, applied to the last dimension), a kernel-1 conv with ``f``'s stride for a Conv ``f``; weight and
    bias start at zero, so the function is unchanged. An ``nn.Sequential`` block is sized by its first and last
    Linear/Conv layers: ``Linear(first.in_features, last.out_features)``, or for a conv block (Conv-BN-ReLU...) a
    kernel-1 conv from ``first.in_channels`` to ``last.out_channels`` that mixes channels, with the stride and padding
    that give the block's output size at every input size (the product of the strides; a layer whose padding is
    smaller than ``dilation * (kernel_size - 1) / 2``, such as ``MaxPool2d(2)``, has no such skip and raises).
    ``kind="identity"``: ``skip`` is :class:`nn.Identity` and needs ``f`` to keep the shape of its input. For other
    modules pass ``example_input``: one forward pass of ``model`` reads the input and output shapes of the targets
    (features in the last dimension, leading dimensions equal; for a module containing a conv and an ``(N, C, ...)``
    input, channels in dimension 1); it also checks every skip's output shape. Every target is validated before the
    model changes.

    Args:
        model: the model.
        targets: module names (see :func:`lightning_bv._select.select_names`); ``""`` is ``model`` itself.
        kind: ``"affine"`` or ``"identity"``.
        exclude: module names to leave alone; wins over ``targets``.
        example_input: optional input of ``model`` for one trial forward pass (``model(example_input)``).

    Returns:
        ``model`` with the targets wrapped in place; the new :class:`AffineSkip` if ``model`` itself was targeted (use
        the return value).

    Raises:
        ValueError: a bad ``kind``, ``targets`` matching nothing, a target that is already a skip, or shapes that do
            not allow the skip.
        TypeError: a target whose shapes cannot be read without ``example_input``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        >>> model = add_skip(model, ["0"])
        >>> model = add_skip(model, ["2"], kind="identity")
        >>> model[0].skip
        Conv2d(3, 8, kernel_size=(1, 1), stride=(2, 2))
        >>> tuple(model(torch.randn(1, 3, 9, 9)).shape)
        (1, 8, 5, 5)

    """
    return _add_skip(model, targets, kind, exclude, example_input)


def _add_skip(
    model: nn.Module,
    targets: Union[str, Sequence[str]],
    kind: str = "affine",
    exclude: Union[str, Sequence[str], None] = None,
    example_input: Any = None,
    shapes: Optional[dict[str, tuple[Any, Any]]] = None,
) -> nn.Module:
    """:func:`add_skip`, or with the targets' ``(input shape, output shape)`` read elsewhere (``shapes``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    _check_skip_args(targets, kind)
    modules = named_modules(model)
    picked = select_names(list(modules), targets, exclude)
    skip_paths = {id(m.skip) for m in modules.values() if is_skip(m)}
    if shapes is None:
        shapes = _trial_shapes(model, {n: modules[n] for n in picked}, example_input)
    plan: list[tuple[str, nn.Module, nn.Module]] = []
    for name in picked:
        module = modules[name]
        if is_skip(module) or id(module) in skip_paths or is_null_space(module):
            raise ValueError(f"`targets` selected {show(name)}, which is already a skip connection or part of one")
        if kind == "affine":
            skip = affine_skip_for(module, name, shapes.get(name))
        else:
            _check_identity(module, name, shapes.get(name))
            skip = nn.Identity()
        if name in shapes:
            _check_skip_shape(name, skip, shapes[name])
        plan.append((name, module, skip))
    parents = {name: _parent(model, name) for name, _, _ in plan if name}
    for name, module, skip in plan:
        wrapper = AffineSkip(module, skip.train(module.training))
        wrapper.training = module.training
        if name == "":
            model = wrapper
        else:
            setattr(parents[name][0], parents[name][1], wrapper)
    return model


def remove_skip(model: nn.Module, merge: bool = False, targets: Union[str, Sequence[str], None] = None) -> nn.Module:
    """Put back the wrapped modules of the :class:`AffineSkip` wrappers in ``model``.

    With ``merge=False`` (default) the skip path is dropped: a trained skip is lost and the function changes. With
    ``merge=True`` the skip is folded into a Linear ``f`` (``(W + C) x + (b + c)``) or into the center tap of a Conv
    ``f`` with an odd kernel, ``groups=1`` and "same-shape" padding, which keeps the function exactly; wrappers that
    cannot be folded raise a ``ValueError`` before anything changes.

    Args:
        model: the model.
        merge: fold the skip into the wrapped module instead of dropping it.
        targets: names of the wrappers to remove (see :func:`lightning_bv._select.select_names`); ``None``: all.

    Returns:
        The model; the wrapped module if ``model`` itself was a wrapper (use the return value).

    Example:
        >>> layer = add_skip(nn.Linear(3, 3), [""], kind="identity")
        >>> x = torch.randn(2, 3)
        >>> y = layer(x)
        >>> layer = remove_skip(layer, merge=True)
        >>> type(layer).__name__, torch.allclose(layer(x), y, atol=1e-6)
        ('Linear', True)

    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if not isinstance(merge, bool):
        raise TypeError(f"`merge` must be a bool, got {merge!r}")
    modules = named_modules(model)
    names = [n for n, m in modules.items() if is_skip(m)]
    if targets is not None:
        names = select_names(names, targets)
    if merge:
        for name in names:
            _check_mergeable(modules[name], name)
    parents = {name: _parent(model, name) for name in names if name}
    for name in reversed(names):  # innermost first, so nested wrappers unwind correctly
        wrapper = cast(AffineSkip, modules[name])
        inner = wrapper.module
        if merge:
            _merge(inner, wrapper.skip)
        if name == "":
            model = inner
        else:
            setattr(parents[name][0], parents[name][1], inner)
    return model


def affine_skip_for(module: nn.Module, name: str = "", shape: Optional[tuple[Any, Any]] = None) -> nn.Module:
    """Return a zero-initialized affine map with ``module``'s input and output shapes, marked as a skip path.

    Args:
        module: a Linear/Conv layer, or a module with ``in_features``/``out_features``.
        name: the module's name, for error messages.
        shape: ``(input_shape, output_shape)`` read by a trial forward pass; used for other modules.

    Example:
        >>> affine_skip_for(nn.Linear(5, 2))
        Linear(in_features=5, out_features=2, bias=True)

    """
    kw = _factory_kwargs(module)
    skip: nn.Module
    sized = _sequential_sizes(module, name)
    if isinstance(module, _CONVS):
        _check_same_shape_padding(module, name)
        conv = parametrize.type_before_parametrizations(module)
        skip = conv(module.in_channels, module.out_channels, 1, stride=module.stride, **kw)
    elif isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    ):
        skip = nn.Linear(int(module.in_features), int(module.out_features), **kw)  # type: ignore[arg-type]
    elif sized is not None:
        skip = _skip_from_sizes(sized, kw)
    elif shape is not None and len(shape[0]) >= 3 and _first_conv(module) is not None:
        skip = _channel_skip_from_shapes(module, name, shape, kw)
    elif shape is not None:
        skip = nn.Linear(int(shape[0][-1]), int(shape[1][-1]), **kw)
    else:
        raise TypeError(
            f"Cannot read the input and output sizes of {show(name)} ({type(module).__name__}): it is not a "
            "Linear/Conv layer, has no `in_features`/`out_features` and is not an nn.Sequential whose first and "
            "last Linear/Conv layers give them. Pass `example_input=` for one trial forward."
        )
    with torch.no_grad():
        for p in skip.parameters():
            p.zero_()
    return null_space(skip)


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


def needs_trial(module: nn.Module, kind: str, name: str = "") -> bool:
    """Whether :func:`add_skip` needs a trial forward (``example_input``) to size a skip around ``module``."""
    if kind == "identity":
        return not isinstance(module, _CONVS) and not (
            isinstance(getattr(module, "in_features", None), int) or _sequential_sizes(module, name) is not None
        )
    try:
        affine_skip_for(module, name)
    except TypeError:
        return True
    return False


def _check_skip_args(targets: Any, kind: Any) -> None:
    """Validate ``targets`` and ``kind`` of :func:`add_skip` (shared with the ``SkipConnections`` callback)."""
    if kind not in _KINDS:
        raise ValueError(f"`kind` must be one of {_KINDS}, got {kind!r}")
    if targets is None:
        raise ValueError("`targets` is required: name the modules to put a skip connection around")


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


def _check_mergeable(wrapper: Any, name: str) -> None:
    inner, skip = wrapper.module, wrapper.skip
    if parametrize.is_parametrized(inner):
        raise ValueError(f"Cannot merge the skip of {show(name)}: its weight is parametrized (e.g. low-rank)")
    if isinstance(inner, nn.Linear) and isinstance(skip, (nn.Linear, nn.Identity)):
        return
    if isinstance(inner, _CONVS) and inner.groups == 1 and _same_shape_padding(inner):
        odd = all(k % 2 == 1 for k in inner.kernel_size)
        if odd and isinstance(skip, nn.Identity):
            return
        if odd and isinstance(skip, _CONVS) and all(k == 1 for k in skip.kernel_size) and skip.stride == inner.stride:
            return
    raise ValueError(
        f"Cannot merge the skip of {show(name)} ({type(inner).__name__}) into it: merging needs a Linear, or a Conv "
        "with groups=1, an odd kernel and padding = dilation * (kernel_size - 1) / 2. Use merge=False to drop the skip."
    )


def _merge(inner: Any, skip: Any) -> None:
    with torch.no_grad():
        weight = inner.weight
        if isinstance(inner, nn.Linear):
            tap = weight
        else:
            tap = weight[(slice(None), slice(None), *(k // 2 for k in inner.kernel_size))]
        if isinstance(skip, nn.Identity):
            tap.diagonal().add_(1.0)
            return
        tap.add_(skip.weight.reshape(tap.shape))
        if skip.bias is not None:
            if inner.bias is None:
                inner.bias = nn.Parameter(skip.bias.detach().clone().to(weight.dtype))
            else:
                inner.bias.add_(skip.bias)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr


def _factory_kwargs(module: nn.Module) -> dict[str, Any]:
    p = next(module.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}
