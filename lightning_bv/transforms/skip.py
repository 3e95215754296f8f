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
from lightning_bv.transforms._skip_shapes import (
    _channel_skip_from_shapes,
    _check_identity,
    _check_same_shape_padding,
    _check_skip_shape,
    _factory_kwargs,
    _first_conv,
    _same_shape_padding,
    _sequential_sizes,
    _skip_from_sizes,
    _trial_shapes,
)
from lightning_bv.transforms._skip_shapes import shape_hooks as shape_hooks  # re-exported (used by the callback)

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
