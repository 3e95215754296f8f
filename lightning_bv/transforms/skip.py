"""Skip connections: :func:`add_skip`, :func:`is_skip`, :func:`remove_skip`.

THEORY.md section 5: a block of the representer theorem is ``z -> V relu(W z - b) + C z + c``; the affine term
``C z + c`` is the null space of the R-BV^2 seminorm and is not regularized. :func:`add_skip` wraps a module ``f`` in
:class:`AffineSkip`, which computes ``f(x) + skip(x)``. The affine ``skip`` starts at zero, so the model computes the
same function right after insertion, and it is marked ``_lbv_null_space = True``: neuron discovery never charges it
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

from lightning_bv._select import named_modules, select_names, show

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_KINDS = ("affine", "identity")


class AffineSkip(nn.Module):
    """``x -> module(x) + skip(x)``: a module with a skip connection around it.

    Args:
        module: the wrapped module ``f``.
        skip: the skip path: an affine layer marked ``_lbv_null_space = True`` (see :func:`affine_skip_for`) or
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
    bias start at zero, so the function is unchanged. ``kind="identity"``: ``skip`` is :class:`nn.Identity` and needs
    ``f`` to keep the shape of its input. For other modules pass ``example_input``: one forward pass of ``model``
    reads the input and output shapes of the targets (features in the last dimension, leading dimensions equal); it
    also checks every skip's output shape. Every target is validated before the model changes.

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
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    _check_skip_args(targets, kind)
    modules = named_modules(model)
    picked = select_names(list(modules), targets, exclude)
    skip_paths = {id(m.skip) for m in modules.values() if is_skip(m)}
    shapes = _trial_shapes(model, {n: modules[n] for n in picked}, example_input)
    plan: list[tuple[str, nn.Module, nn.Module]] = []
    for name in picked:
        module = modules[name]
        if is_skip(module) or id(module) in skip_paths or getattr(module, "_lbv_null_space", False):
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
    """Return a zero-initialized affine map with ``module``'s input and output shapes, marked ``_lbv_null_space``.

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
    if isinstance(module, _CONVS):
        _check_same_shape_padding(module, name)
        conv = parametrize.type_before_parametrizations(module)
        skip = conv(module.in_channels, module.out_channels, 1, stride=module.stride, **kw)
    elif isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    ):
        skip = nn.Linear(int(module.in_features), int(module.out_features), **kw)  # type: ignore[arg-type]
    elif shape is not None:
        skip = nn.Linear(int(shape[0][-1]), int(shape[1][-1]), **kw)
    else:
        raise TypeError(
            f"Cannot read the input and output sizes of {show(name)} ({type(module).__name__}): it is not a "
            "Linear/Conv layer and has no `in_features`/`out_features`. Pass `example_input=` for one trial forward."
        )
    with torch.no_grad():
        for p in skip.parameters():
            p.zero_()
    skip._lbv_null_space = True  # type: ignore[assignment]
    return skip


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


def _trial_shapes(model: nn.Module, targets: dict[str, nn.Module], example_input: Any) -> dict[str, tuple[Any, Any]]:
    """Run ``model(example_input)`` once (eval mode, no grad) and record each target's input and output shapes."""
    if example_input is None:
        return {}
    seen: dict[str, tuple[Any, Any]] = {}

    def record(name: str) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if name not in seen and len(args) == 1 and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                seen[name] = (tuple(args[0].shape), tuple(output.shape))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in targets.items()]
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
