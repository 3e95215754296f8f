"""The group model: :class:`NeuronGroup` (one set of neurons and its slots) and :class:`NeuronGroups` (the report)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

import torch
from torch import Tensor

from lightning_bv.neurons.slot import Slot

# the end of the skip reason of an activation that is not positively homogeneous (written by the analysis)
_NOT_HOMOGENEOUS = "is not positively homogeneous (s(a t) != a s(t) for a > 0), so it has no neurons to regularize"


class NeuronGroup:
    """One group of neurons found by :func:`~lightning_bv.neurons.find_neurons`.

    Attributes:
        name: the group's name (its producer's module name; ``"<module>:rank"`` for low-rank components).
        producers: sorted module names of the Linear/Conv layers that make the pre-activation; a BatchNorm whose
            input is not one such layer's output (a concatenation, as in DenseNet) is its own producer and norm.
        norms: the BatchNorm module name between each producer and the activation, or None (aligned with
            ``producers``).
        activation: ``"relu"``, ``"leaky_relu"``, ``"prelu"`` or ``"identity"`` (low-rank components).
        consumers: sorted module names of every Linear/Conv that reads the activation.
        num_neurons: number of neurons K.
        w_slots, b_slots, v_slots: where w_k, b_k and v_k live (see :class:`Slot`).
        activation_module: the module that called the activation when it holds one parameter per neuron (an
            ``nn.PReLU`` with ``num_parameters=K``; compaction shrinks it), else None.

    """

    def __init__(
        self,
        name: str,
        producers: Sequence[str],
        norms: Sequence[str | None],
        activation: str,
        consumers: Sequence[str],
        num_neurons: int,
        w_slots: Sequence[Slot],
        b_slots: Sequence[Slot],
        v_slots: Sequence[Slot],
        activation_module: str | None = None,
    ) -> None:
        self.name = name
        self.producers = tuple(producers)
        self.norms = tuple(norms)
        self.activation = activation
        self.consumers = tuple(consumers)
        self.num_neurons = num_neurons
        self.w_slots = tuple(w_slots)
        self.b_slots = tuple(b_slots)
        self.v_slots = tuple(v_slots)
        self.activation_module = activation_module

    @property
    def producer(self) -> str:
        """The first producer (the only one unless the pre-activation is a sum)."""
        return self.producers[0]

    @property
    def norm(self) -> str | None:
        """The BatchNorm between the (first) producer and the activation, or None."""
        return next((n for n in self.norms if n is not None), None)

    def slots(self) -> tuple[Slot, ...]:
        """All slots: w, bias, v."""
        return self.w_slots + self.b_slots + self.v_slots

    @torch.no_grad()
    def silent_without_input(self) -> Tensor:
        """Per neuron (bool, on the CPU): ``s(b_k) == 0``, so its output is exactly 0 when ``w_k = 0``.

        ``b_k`` is the sum of its bias entries (0 without any). With BatchNorm, ``w_k`` is the BatchNorm weight and
        ``b_k`` its bias, so ``w_k = 0`` leaves exactly ``b_k`` before the activation, in training and in eval.
        """
        bias = torch.zeros(self.num_neurons, dtype=torch.float64)
        for s in self.b_slots:
            bias += s.tensor().detach().double().cpu().reshape(self.num_neurons)
        return bias <= 0 if self.activation == "relu" else bias == 0

    def parameters(self) -> list[Tensor]:
        """The distinct leaf parameters this group reads or writes."""
        seen: dict[int, Tensor] = {}
        for s in self.slots():
            f = s._lowrank()
            for p in f if f is not None else (s.written(),):
                seen.setdefault(id(p), p)
        return list(seen.values())

    def __repr__(self) -> str:
        norm = f", norm={self.norm!r}" if self.norm else ""
        return (
            f"NeuronGroup({self.name!r}, producers={self.producers}{norm}, activation={self.activation!r}, "
            f"consumers={self.consumers}, num_neurons={self.num_neurons})"
        )


class NeuronGroups(Sequence[NeuronGroup]):
    """The groups found in a model (a sequence, also indexable by group name) and what was skipped, and why."""

    def __init__(self, groups: Sequence[NeuronGroup], skipped: Sequence[tuple[str, str]] = ()) -> None:
        self._groups = list(groups)
        self.skipped: list[tuple[str, str]] = list(skipped)
        self.lifted: list[str] = []  # layers lift_shared_weights wrote as A B for these groups

    @overload
    def __getitem__(self, i: int) -> NeuronGroup: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[NeuronGroup]: ...
    @overload
    def __getitem__(self, i: str) -> NeuronGroup: ...
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, str):
            for g in self._groups:
                if g.name == i:
                    return g
            raise KeyError(f"no group named {i!r}; groups: {[g.name for g in self._groups]}")
        return self._groups[i]

    def __len__(self) -> int:
        return len(self._groups)

    def __iter__(self) -> Iterator[NeuronGroup]:
        return iter(self._groups)

    @property
    def names(self) -> list[str]:
        """Group names in order."""
        return [g.name for g in self._groups]

    def non_homogeneous(self) -> dict[str, int]:
        """How many activations of each kind were skipped for not being positively homogeneous (ReLU6, GELU, ...).

        Example:
            >>> from torch import nn
            >>> from lightning_bv import find_neurons
            >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU6(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 1))
            >>> find_neurons(net, torch.randn(2, 3)).non_homogeneous()
            {'ReLU6': 1, 'GELU': 1}

        """
        counts: dict[str, int] = {}
        for _, why in self.skipped:
            if why.endswith(_NOT_HOMOGENEOUS):
                kind = why.split(" ", 1)[0]
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    def found_instead(self) -> str:
        """What the model has instead of ReLU-like neurons, for a message (empty when nothing was skipped for that).

        Example:
            >>> from torch import nn
            >>> from lightning_bv import find_neurons
            >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU6(), nn.Linear(8, 8), nn.ReLU6(), nn.Linear(8, 1))
            >>> print(find_neurons(net, torch.randn(2, 3)).found_instead())  # doctest: +NORMALIZE_WHITESPACE
            found 2 ReLU6 activation(s), which are not positively homogeneous (only ReLU, LeakyReLU and PReLU
            neurons can be regularized)

        """
        counts = self.non_homogeneous()
        if not counts:
            return ""
        found = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        return (
            f"found {found} activation(s), which are not positively homogeneous (only ReLU, LeakyReLU and PReLU "
            "neurons can be regularized)"
        )

    def __str__(self) -> str:
        rows = [("group", "neurons", "activation", "producers", "norm", "consumers")]
        for g in self._groups:
            rows.append(
                (
                    g.name,
                    str(g.num_neurons),
                    g.activation,
                    ", ".join(g.producers),
                    g.norm or "-",
                    ", ".join(g.consumers),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"{len(self._groups)} neuron group(s), {sum(g.num_neurons for g in self._groups)} neurons"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.lifted:
            lines.append("shared weights lifted to a product A B: " + ", ".join(self.lifted))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"NeuronGroups({self.names}, skipped={len(self.skipped)})"
