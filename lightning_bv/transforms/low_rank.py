"""Low-rank weights: :func:`apply_low_rank`, :func:`is_low_rank`, :func:`remove_low_rank` (and :func:`factorize`).

docs/theory.md 5: between two ReLU layers the product ``W_{l+1} V_l`` has rank at most the bottleneck width, so a
deep network of the representer theorem has low-rank weight matrices. :func:`apply_low_rank` writes the ``weight`` of
each targeted ``nn.Linear`` / ``nn.Conv1d/2d/3d`` as ``U @ V`` through :mod:`torch.nn.utils.parametrize`:

* ``module.parametrizations.weight.original0`` (``FACTOR_U``) is ``U`` of shape ``[out, r]``;
* ``module.parametrizations.weight.original1`` (``FACTOR_V``) is ``V`` of shape ``[r, in * prod(kernel_size)]``;
* ``module.weight`` is ``(U @ V).reshape(weight_shape)``, recomputed at each access.

``U`` and ``V`` start from the truncated SVD of the current weight, with the square root of the singular values on each
side, so ``||W_before - W_after||_F`` is the root of the sum of the discarded squared singular values. Each rank-1
component ``j`` (column ``U[:, j]``, row ``V[j, :]``) acts as a neuron with identity activation; a proximal step can
zero components (see :func:`low_rank_live_components`).

Saving: torch refuses to pickle a parametrized module (``torch.save(model)`` raises). Save and load the
``state_dict`` instead, into a model that went through the same :func:`apply_low_rank` call; a saved rank that differs
from the fresh model's (as with ``energy=``, or after compaction) is taken from the state_dict, and the factors of that
layer become new Parameters (build the optimizer after loading). :func:`copy.deepcopy` works.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> model = apply_low_rank(model, rank=3)
    >>> is_low_rank(model[0]), low_rank_rank(model[2]), tuple(model[0].weight.shape)
    (True, 3, (16, 8))
    >>> fresh = apply_low_rank(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), rank=3)
    >>> _ = fresh.load_state_dict(model.state_dict())  # not torch.save(model): parametrized modules do not pickle
    >>> x = torch.randn(2, 8)
    >>> torch.equal(fresh(x), model(x))
    True

"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_bv._layers import U_KEY, V_KEY, has_low_rank_weight, plist_factors, set_plist_factors
from lightning_bv._layers import LowRankWeight as LowRankWeight  # re-exported
from lightning_bv._layers import low_rank_factors as low_rank_factors  # re-exported
from lightning_bv._layers import weight_parametrizations as _plist
from lightning_bv._select import Targets, named_modules, select_names
from lightning_bv._sharding import full
from lightning_bv.transforms._factored import _factored_class, _plain_class
from lightning_bv.transforms._factored import factorize as factorize  # re-exported
from lightning_bv.transforms._low_rank_checks import _candidate_names as _candidate_names  # used by the callback
from lightning_bv.transforms._low_rank_checks import _check_model
from lightning_bv.transforms._low_rank_checks import _check_rank_energy as _check_rank_energy  # used by the callback
from lightning_bv.transforms._low_rank_checks import _layer_rank as _layer_rank  # used by the callback


def is_low_rank(module: nn.Module) -> bool:
    """Return whether ``module.weight`` is parametrized by :class:`LowRankWeight` (see :func:`apply_low_rank`).

    Example:
        >>> layer = nn.Linear(4, 4)
        >>> is_low_rank(layer), is_low_rank(apply_low_rank(layer, rank=1))
        (False, True)

    """
    return has_low_rank_weight(module)


def low_rank_rank(module: nn.Module) -> int:
    """Return the number of components ``r`` of a low-rank module (zeroed components included).

    Raises:
        ValueError: if ``module`` is not low-rank.

    Example:
        >>> low_rank_rank(apply_low_rank(nn.Linear(5, 7), rank=4))
        4

    """
    factors = low_rank_factors(module)
    if factors is None:
        raise ValueError(f"{type(module).__name__} is not low-rank; call `apply_low_rank` on it first")
    return int(factors[0].shape[1])


def low_rank_live_components(module: nn.Module, tol: float = 0.0) -> int:
    """Count the components ``j`` with ``||U[:, j]|| * ||V[j, :]|| > tol`` (the others contribute nothing).

    Example:
        >>> layer = apply_low_rank(nn.Linear(5, 7), rank=3)
        >>> with torch.no_grad():
        ...     _ = layer.parametrizations.weight.original1[0].zero_()
        >>> low_rank_live_components(layer)
        2

    """
    factors = low_rank_factors(module)
    if factors is None:
        raise ValueError(f"{type(module).__name__} is not low-rank; call `apply_low_rank` on it first")
    U, V = (full(f.detach()) for f in factors)  # noqa: N806  (split across ranks under FSDP2: gathered)
    strength = (U * U).sum(0).sqrt() * (V * V).sum(1).sqrt()
    return int((strength > tol).sum())


def apply_low_rank(
    model: nn.Module,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    targets: Targets = None,
    exclude: Targets = None,
) -> nn.Module:
    """Parametrize the weight of each targeted Linear/Conv layer as ``U @ V`` of low rank, in place.

    ``U`` and ``V`` are new Parameters: build the optimizer after this call. Dtype and device are kept. Every target is
    resolved and validated before any layer changes; on failure the model is left exactly as it was.

    Args:
        model: the model (itself a Linear/Conv layer, or containing some).
        rank: the rank ``r`` of every targeted layer, ``1 <= r <= min(out, in * prod(kernel_size))``.
        energy: in ``(0, 1]``: per layer, the smallest rank keeping this fraction of the sum of squared singular
            values. Give exactly one of ``rank`` and ``energy``.
        targets: module names (see :func:`lightning_bv._select.select_names`); ``None`` selects every
            Linear/Conv layer. A targeted module of another type is an error.
        exclude: module names to leave alone; wins over ``targets``.

    Returns:
        ``model``, changed in place.

    Raises:
        ValueError: bad ``rank``/``energy``, a rank too large for a layer, a grouped conv, an already parametrized
            weight, or ``targets`` matching nothing (:class:`~lightning_bv._select.TargetsMatchNothingError`).
        TypeError: a targeted module that is not a Linear/Conv layer.

    Example:
        >>> model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> _ = apply_low_rank(model, energy=0.9, targets=["0"])
        >>> is_low_rank(model[0]), is_low_rank(model[2])
        (True, False)

    """
    _check_model(model)
    _check_rank_energy(rank, energy)
    modules = named_modules(model)
    names = select_names(_candidate_names(model, modules, targets), targets, exclude)
    _apply_ranks(modules, {name: _layer_rank(name, modules[name], rank, energy) for name in names})
    return model


def remove_low_rank(model: nn.Module, merge: bool = True) -> nn.Module:
    """Undo :func:`apply_low_rank` on every low-rank layer of ``model``.

    The weight that existed before :func:`apply_low_rank` is not kept (the discarded singular directions are gone), so
    there is nothing to "restore": both choices keep the current function.

    Args:
        model: the model.
        merge: ``True``: each weight becomes a plain Parameter holding the dense product ``U @ V`` (a new Parameter:
            rebuild the optimizer). ``False``: keep the factors as two layers, exactly as :func:`factorize`.

    Returns:
        The model. With ``merge=False`` and a low-rank ``model`` itself, the new :class:`nn.Sequential`; use the return
        value.

    Example:
        >>> layer = apply_low_rank(nn.Linear(6, 6), rank=2)
        >>> layer = remove_low_rank(layer)
        >>> is_low_rank(layer), type(layer).__name__, torch.linalg.matrix_rank(layer.weight.detach()).item()
        (False, 'Linear', 2)

    """
    _check_model(model)
    if not isinstance(merge, bool):
        raise TypeError(f"`merge` must be a bool, got {merge!r}")
    if not merge:
        return factorize(model)
    for module in list(model.modules()):
        if is_low_rank(module):
            _merge_factors_(module)
    return model


def _merge_factors_(module: Any) -> None:
    """Replace the low-rank parametrization of ``module.weight`` by one Parameter holding ``U @ V``.

    Not ``parametrize.remove_parametrizations``: it deletes the ``weight`` property from the module's class, which a
    ``copy.deepcopy`` of the module shares, so the copy would lose its weight.
    """
    factors = low_rank_factors(module)
    assert factors is not None
    with torch.no_grad():
        dense = module.weight.detach().clone()
    requires_grad = any(f.requires_grad for f in factors)
    bias = module._parameters.pop("bias", None) if "bias" in module._parameters else None
    has_bias = "bias" in module._parameters or bias is not None
    cls = _plain_class(parametrize.type_before_parametrizations(module))
    del module._modules["parametrizations"]
    module.__class__ = cls
    module.weight = nn.Parameter(dense, requires_grad=requires_grad)
    if has_bias:  # weight first, as in a fresh layer
        module._parameters["bias"] = bias


def _resize_factors_on_load(plist: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: take the rank of the saved factors when it differs from the current one."""
    U, V = state_dict.get(prefix + U_KEY), state_dict.get(prefix + V_KEY)  # noqa: N806
    old_u, old_v = plist_factors(plist)
    if not (isinstance(U, Tensor) and isinstance(V, Tensor)) or (U.shape, V.shape) == (old_u.shape, old_v.shape):
        return
    if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[0] or U.shape[0] != old_u.shape[0]:
        return  # let load_state_dict report the size mismatch
    if V.shape[1] != old_v.shape[1]:
        return
    set_plist_factors(
        plist,
        nn.Parameter(old_u.new_empty(U.shape), requires_grad=old_u.requires_grad),
        nn.Parameter(old_v.new_empty(V.shape), requires_grad=old_v.requires_grad),
    )
    for p in plist:  # type: ignore[attr-defined]
        if isinstance(p, LowRankWeight):
            p.rank = int(U.shape[1])


def _apply_ranks(modules: dict[str, nn.Module], ranks: dict[str, int]) -> None:
    """Parametrize ``modules[name]`` with rank ``ranks[name]`` for each name, all or none (undo on failure)."""
    done: list[tuple[Any, Tensor, list[str], type]] = []
    try:
        for name, r in ranks.items():
            module: Any = modules[name]
            old, order, cls = module.weight, list(module._parameters), type(module)
            module.__class__ = _factored_class(cls)
            done.append((module, old, order, cls))
            parametrize.register_parametrization(module, "weight", LowRankWeight(r, tuple(old.shape)), unsafe=True)
            _plist(module).register_load_state_dict_pre_hook(_resize_factors_on_load)
    except BaseException:
        for module, old, order, cls in reversed(done):
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module.__class__ = cls
            module.weight = old
            for key in order:  # restore the parameter order, hence the state_dict key order
                module._parameters[key] = module._parameters.pop(key)
        raise
