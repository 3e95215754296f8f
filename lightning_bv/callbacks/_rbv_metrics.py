"""What :class:`~lightning_bv.callbacks.RBVRegularization` logs about its groups, computed from them (private)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lightning_bv.functional.rbv import group_norms
from lightning_bv.neurons import NeuronGroup

PROGRESS_BAR = ("bv/rbv_norm", "bv/active_neurons")  # shown in the progress bar too


@torch.no_grad()
def rbv_metrics(groups: Iterable[NeuronGroup], q: int = 2) -> dict[str, float]:
    """The R-BV^2 norm of ``groups`` and their live neurons, keyed by the names the callback logs them under.

    ``bv/rbv_norm`` (``sum_k ||v_k||_q ||w_k||_2`` over all groups), ``bv/active_neurons`` (ReLU neurons with a
    nonzero score), ``bv/active_fraction`` (of all ReLU neurons) and, when some groups are the rank components of a
    low-rank layer (activation ``"identity"``: not neurons), ``bv/active_rank_components``.
    """
    total, active, count, components, low_rank = 0.0, 0, 0, 0, False
    for g in groups:
        w, v = group_norms(g, q)
        s = w * v
        total += float(s.sum())
        if g.activation == "identity":  # rank components of a low-rank layer: not neurons
            components += int((s > 0).sum())
            low_rank = True
            continue
        active += int((s > 0).sum())
        count += g.num_neurons
    out = {"bv/rbv_norm": total, "bv/active_neurons": float(active), "bv/active_fraction": active / max(count, 1)}
    if low_rank:
        out["bv/active_rank_components"] = float(components)
    return out
