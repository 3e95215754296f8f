"""What the in-place functions do with a neuron group whose weights are NaN or infinite (``on_nonfinite``).

``"ignore"`` checks nothing; ``"raise"`` stops with :class:`NonFiniteWeightsError` naming the group, the neurons
and the side; ``"skip"`` leaves such a group alone. The norms that the update computes anyway are what is checked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_bv._checks import check_choice
from lightning_bv._sharding import all_reduce_, local
from lightning_bv.functional._kernels import _norms
from lightning_bv.neurons import NeuronGroup, Slot

NONFINITE = ("ignore", "raise", "skip")


class NonFiniteWeightsError(FloatingPointError):
    """A neuron group's weights, or their norms, are NaN or infinite (raised with ``on_nonfinite="raise"``)."""


def _check_nonfinite(on_nonfinite: object) -> str:
    check_choice("on_nonfinite", on_nonfinite, NONFINITE, "what to do with a group whose weights are NaN or infinite")
    return str(on_nonfinite)


def _kind(t: Tensor) -> str:
    nan, inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
    return " and ".join(k for k, on in (("nan", nan), ("inf", inf)) if on) or "finite"


def _describe_nonfinite(group: NeuronGroup, w: Tensor, v: Tensor) -> str:
    """Which neurons of ``group`` have a non-finite norm, on which side, and whether the entries themselves are."""
    parts = []
    for side, norms, slots in (("input", w, group.w_slots), ("output", v, group.v_slots)):
        bad = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
        if not bad:
            continue
        shown = ", ".join(str(i) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
        entries = [s.tensor().detach() for s in slots if s.regularized]
        finite = all(bool(torch.isfinite(t).all()) for t in entries)
        why = (
            f"the entries are finite but their squares overflow {entries[0].dtype}"
            if finite
            else _kind(torch.cat([t.flatten() for t in entries]))
        )
        parts.append(f"{_kind(norms)} norm of the {side} weights of neuron(s) [{shown}] of {norms.numel()} ({why})")
    return f"neuron group '{group.name}' has non-finite weights: " + "; ".join(parts)


def _skip_nonfinite(group: NeuronGroup, w: Tensor, v: Tensor, on_nonfinite: str) -> bool:
    """Whether to leave ``group`` alone because its norms ``w``, ``v`` are not finite (raises with "raise")."""
    if on_nonfinite == "ignore" or bool(torch.isfinite(torch.cat([w, v])).all()):
        return False
    if on_nonfinite == "raise":
        raise NonFiniteWeightsError(
            _describe_nonfinite(group, w, v) + '. Stopping instead of spreading them (on_nonfinite="raise"); lower the '
            'learning rate or clip gradients, or pass on_nonfinite="skip" to leave such a group alone.'
        )
    return True


def _nonfinite_groups(glist: list[NeuronGroup], norms: list[tuple[Tensor, Tensor]], on_nonfinite: str) -> list[str]:
    """Names of the groups whose norms are not finite, checked with one sync; raises for the first with "raise"."""
    if on_nonfinite == "ignore" or not glist:
        return []
    finite = torch.stack([torch.isfinite(w).all() & torch.isfinite(v).all() for w, v in norms]).tolist()
    bad = [i for i, ok in enumerate(finite) if not ok]
    if bad and on_nonfinite == "raise":
        _skip_nonfinite(glist[bad[0]], *norms[bad[0]], on_nonfinite)  # raises with the description
    return [glist[i].name for i in bad]


def _all_finite(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor is all finite, from its smallest and largest entry, with one sync for all.

    For tensors split across ranks, one all-reduce of the answers, so that every rank decides alike.
    """
    locs = [local(t) for t in tensors]
    none = torch.zeros((), dtype=torch.bool)
    bad = torch.stack(
        [(~torch.stack(torch.aminmax(lt.tensor)).isfinite()).any() if lt.tensor.numel() else none for lt in locs]
    ).float()
    group = next((lt.group for lt in locs if lt.split), None)
    return [not b for b in all_reduce_([bad], group)[0].bool().tolist()]


def _nonfinite_weight_groups(glist: list[NeuronGroup], slots: list[list[Slot]], on_nonfinite: str) -> list[str]:
    """For an update that needs no norms: names of the groups whose weights are not finite (raises with "raise").

    ``slots``: each group's regularized slots. The smallest and largest entry of each tensor first (one pass, one
    sync); the groups' norms only when one is not finite, since a consumer's bad entries may be in another group's
    columns.
    """
    if on_nonfinite == "ignore" or not glist:
        return []
    tensors = {id(t): t for ss in slots for t in (s.tensor() for s in ss)}  # a shared matrix is read once
    finite_of = dict(zip(tensors, _all_finite(list(tensors.values()))))
    suspects = [g for g, ss in zip(glist, slots) if not all(finite_of[id(s.tensor())] for s in ss)]
    if not suspects:
        return []
    return _nonfinite_groups(suspects, [_norms(g, 2) for g in suspects], on_nonfinite)
