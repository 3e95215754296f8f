"""Lifting: :func:`lift_shared_weights` writes each weight that two neuron groups share as a product ``A B``.

In a plain chain ``Linear-ReLU-Linear-ReLU-Linear`` (VGG without BatchNorm, AlexNet, MLPs) the hidden matrix ``W2`` is
at once the output weights (columns) of the first layer's neurons and the input weights (rows) of the second's: no
per-neuron rescaling leaves the seminorm of both groups invariant, so no per-neuron proximal step is exact. The deep
representer theorem's architecture has a linear bottleneck there instead: ``W2 = A B`` with ``A`` of shape
``[K2, r]`` and ``B`` of shape ``[r, K1]``. Then neuron k of the first layer owns ``v_k = B[:, k]``, neuron j of the
second owns ``w_j = A[j, :]``, nothing is shared, and the penalty on the neurons alone drives the rank of ``A B`` down.

The lift is :func:`~lightning_bv.apply_low_rank` at full rank ``r = min(K2, K1 * kernel)`` from the SVD of ``W2``
(``A = U S^1/2``, ``B = S^1/2 V^T``): the same function, up to float rounding. Its parametrization is marked
``lifted``, so that :func:`~lightning_bv.compact` merges ``A B`` back into one dense weight when that is smaller. A
layer that an explicit :func:`~lightning_bv.apply_low_rank` (or the ``LowRank`` callback) made low-rank between two
groups is read the same way, at its own rank; it is not lifted again, and not merged back.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_bv import find_neurons
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 1))
    >>> x = torch.randn(4, 3)
    >>> y = net(x)
    >>> groups = find_neurons(net, x)
    >>> lift_shared_weights(net, groups).lifted
    ['2']
    >>> [s.factor for s in groups["0"].v_slots], [s.factor for s in groups["2"].w_slots]
    ([True], [True])
    >>> torch.allclose(net(x), y, atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_bv._layers import WEIGHTED, LowRankWeight, low_rank_factors
from lightning_bv._sharding import refuse_split
from lightning_bv.functional.rbv import prox_
from lightning_bv.neurons import NeuronGroup, NeuronGroups, find_neurons, own_factors, shared_weights
from lightning_bv.transforms.low_rank import _apply_ranks, _plist


@dataclass
class LiftReport:
    """What :func:`lift_shared_weights` did.

    Attributes:
        lifted: names of the layers written as a full-rank product ``A B``.
        skipped: ``(layer name, why)`` for each shared weight that could not be lifted.
        ranks: the rank of each lifted layer.
    """

    lifted: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"lifted {len(self.lifted)} shared weight(s) to a product A B: " + (", ".join(
            f"{n} (rank {self.ranks[n]})" for n in self.lifted) or "none")]  # fmt: skip
        lines += [f"  not lifted {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def is_lifted(module: nn.Module) -> bool:
    """Whether ``module``'s weight is a product ``A B`` made by :func:`lift_shared_weights`."""
    if low_rank_factors(module) is None:
        return False
    return any(getattr(p, "lifted", False) for p in _plist(module))


def _why_not(name: str, module: Any, aliases: dict[int, list[str]]) -> str:
    if not isinstance(module, WEIGHTED):
        return f"it is a {type(module).__name__}, not a Linear/Conv layer"
    if parametrize.is_parametrized(module, "weight"):
        return "its weight already has a parametrization (someone else's): it cannot be factorized as well"
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "it is lazy and not initialized yet"
    if getattr(module, "groups", 1) != 1:
        return f"it is a grouped convolution (groups={module.groups})"
    if len(aliases.get(id(module), [])) > 1:
        return f"the module is registered under several names ({', '.join(aliases[id(module)])})"
    return ""


@torch.no_grad()
def lift_shared_weights(
    model: nn.Module,
    groups: Iterable[NeuronGroup] | None = None,
    example_input: Tensor | tuple[Any, ...] | None = None,
    *,
    normalize: bool = False,
) -> LiftReport:
    """Write every weight shared by two neuron groups as a full-rank product ``A B`` (same function), in place.

    The groups passed in are updated in place: the group before each lifted layer owns the columns of ``B``, the one
    after it the rows of ``A``. ``A`` and ``B`` are new Parameters: build the optimizer after this call (the
    ``RBVRegularization`` callback lifts in ``setup``, before Lightning builds it). A shared weight that cannot
    be factorized (a parametrization of someone else's, a grouped convolution, a module registered under two names)
    is left as it is and listed in ``report.skipped`` with the reason. All lifts succeed or none is applied.

    Args:
        model: the model.
        groups: its neuron groups (:func:`~lightning_bv.find_neurons`); found with ``example_input`` when None.
        example_input: an input for :func:`~lightning_bv.find_neurons`, when ``groups`` is not given.
        normalize: first apply the function-preserving normalize of :func:`~lightning_bv.prox_` (``tau=0``) to
            all groups, in order, when there is something to lift. The shared matrices are then the same for a model
            and any per-neuron positive rescale of it, and so are their factors: the two train identically (the
            ``RBVRegularization`` callback does this).

    Returns:
        LiftReport: the layers lifted (with their ranks) and those skipped, with why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if groups is None:
        if example_input is None:
            raise ValueError(
                "`lift_shared_weights` needs the model's neuron groups: pass `groups=lightning_bv.find_neurons(model, "
                "x)` or `example_input=x`"
            )
        groups = find_neurons(model, example_input)
    if not isinstance(normalize, bool):
        raise TypeError(f"`normalize` must be a bool, got {normalize!r}")
    refuse_split(model, "lift_shared_weights")
    glist = list(groups)
    aliases: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(name)
    modules = dict(model.named_modules())
    report = LiftReport()
    ranks: dict[str, int] = {}
    for name in shared_weights(glist):
        module = modules.get(name)
        why = "it is not a module of `model`" if module is None else _why_not(name, module, aliases)
        if why:
            report.skipped.append((name, why))
            continue
        weight = cast(Tensor, cast(Any, module).weight)
        ranks[name] = min(int(weight.shape[0]), weight[0].numel())
    if normalize and ranks:
        prox_(glist, 0.0)
    _apply_ranks(cast(dict[str, nn.Module], modules), ranks)
    for name in ranks:
        for p in _plist(modules[name]):
            if isinstance(p, LowRankWeight):
                p.lifted = True
    own_factors(glist)
    report.lifted, report.ranks = list(ranks), ranks
    if isinstance(groups, NeuronGroups):
        groups.lifted = list(ranks)
    return report
