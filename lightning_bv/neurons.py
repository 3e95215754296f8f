"""Neuron groups: which weights belong to which ReLU neuron, found in any ``nn.Module``.

A :class:`NeuronGroup` is one set of neurons z -> s(W z - b) read by some consumers (docs/theory.md section 1). It
records *slots*: where each neuron's input weights ``w_k`` (rows of the producer, or the BatchNorm gamma), its bias
and its output weights ``v_k`` (columns of every consumer) live. Slots hold the modules themselves and read
``module.weight`` at call time, so a group stays valid after a low-rank parametrization and under DDP.

:func:`find_neurons` runs the model once and reads the real dataflow (see :mod:`lightning_bv._trace`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, overload

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_bv._layers import BATCH_NORMS, CONVS, FACTOR_U, FACTOR_V, WEIGHTED
from lightning_bv._layers import is_null_space as is_null_space  # re-exported
from lightning_bv._layers import low_rank_factors as low_rank_factors  # re-exported
from lightning_bv._select import Targets, select_names
from lightning_bv._sharding import all_reduce_, full, local
from lightning_bv._trace import ACTIVATIONS, Op, Ref, Trace


def _resolve(module: nn.Module, path: str) -> Tensor:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class Slot:
    """Where the entries of every neuron of a group live in one tensor.

    ``dim=0``: neuron k owns row k (producer weight rows, a BatchNorm gamma/beta entry, a bias entry).
    ``dim=1``: neuron k owns input columns ``index[k]`` of a consumer weight (all of them along the other axes:
    output rows and kernel positions); ``index=None`` means column k alone.
    ``regularized=False`` marks entries that must be rescaled with the neuron (function preservation) but are not
    charged by the seminorm (skip connections, biases).
    ``factor=True`` (``param="weight"`` of a low-rank layer ``W = U V`` only): the slot owns its side's factor instead
    of the product, row k of ``U`` (``dim=0``) or the columns of ``V`` that read input channel k (``dim=1``, ``V``
    seen as ``[r, in, *kernel]``). That is how a low-rank layer between two neuron groups is read: the producing
    group's neurons own ``V``'s columns, the consuming group's own ``U``'s rows, and no tensor is shared.
    """

    def __init__(
        self,
        module: nn.Module,
        module_name: str,
        param: str,
        dim: int,
        index: Tensor | None = None,
        regularized: bool = True,
        factor: bool = False,
    ) -> None:
        self.module = module
        self.module_name = module_name
        self.param = param
        self.dim = dim
        self.index = index
        self.regularized = regularized
        self.factor = factor

    def __repr__(self) -> str:
        idx = "" if self.index is None else f", index={tuple(self.index.shape)}"
        fac = ", factor=True" if self.factor else ""
        return f"Slot({self.module_name}.{self.param}, dim={self.dim}{idx}, regularized={self.regularized}{fac})"

    def owning_product(self) -> Slot:
        """The same slot on the module's whole weight (undoes :meth:`owning_factor`)."""
        return Slot(self.module, self.module_name, self.param, self.dim, self.index, self.regularized)

    def owning_factor(self) -> Slot:
        """The same slot on its side's factor of the low-rank weight (see ``factor``)."""
        return Slot(self.module, self.module_name, self.param, self.dim, self.index, self.regularized, factor=True)

    # -- reading ---------------------------------------------------------------------------------------------
    def tensor(self) -> Tensor:
        """The tensor holding the entries (differentiable): the product U @ V for a low-rank weight, or its factor.

        A ``factor`` slot's ``V`` comes as a ``[r, in, *kernel]`` view, so rows and columns mean what they mean on a
        dense weight.
        """
        if self.factor:
            f = low_rank_factors(self.module)
            if f is None:
                raise ValueError(f"slot {self!r}: '{self.module_name}' is no longer low-rank")
            if self.dim == 0:
                return f[0]
            return f[1].view(f[1].shape[0], *self._product_shape()[1:])  # without computing the product
        return _resolve(self.module, self.param)

    def _kernel(self, t: Tensor) -> int:
        return t[0, 0].numel() if t.dim() > 2 else 1

    def reduce(self, t: Tensor, how: str = "sq") -> Tensor:
        """Per-neuron sum of squares (``how="sq"``) or of absolute values (``"abs"``) of the entries in ``t``.

        Half-precision entries are summed in float32 (the result is float32): a row of fp16 entries near 300 is
        finite, its sum of squares is not. A ``t`` split by rows across ranks (FSDP2) costs one all-reduce.
        """
        part, group = self.reduce_part(t, how)
        return all_reduce_([part], group)[0]

    def reduce_part(self, t: Tensor, how: str = "sq") -> tuple[Tensor, Any]:
        """The share of :meth:`reduce` on this rank, and the process group to sum it over (None: it is the whole sum).

        For a tensor split by rows (FSDP2), the sums over the local rows; rows held elsewhere count 0 here.
        """
        loc = local(t)
        if loc.split and torch.is_grad_enabled() and t.requires_grad:
            raise NotImplementedError(
                f"slot {self!r}: norms of weights split across ranks (FSDP2) are not differentiable here (the "
                "all-reduce that completes them has no gradient); compute them under torch.no_grad(), or use "
                "PathNormRegularization's modes, which need no gradient of the norms"
            )
        r = self._reduce(loc.tensor, how)
        if not loc.split or self.dim != 0:
            return r, loc.group
        whole = r.new_zeros(loc.rows)
        whole[loc.start : loc.start + r.shape[0]] = r
        return whole, loc.group

    def _reduce(self, t: Tensor, how: str) -> Tensor:
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        if self.dim == 0:
            # rows: vector_norm reads t once without a temporary (about 3x faster than (t * t).sum(1) on CPU); the
            # same op with and without grad, so scores do not depend on the grad mode
            n = torch.linalg.vector_norm(t.reshape(t.shape[0], -1), ord=2 if how == "sq" else 1, dim=1)
            return n * n if how == "sq" else n
        e = t * t if how == "sq" else t.abs()
        cols = e.sum(0)  # column sums are a strided reduction over rows; cheaper than vector_norm(dim=0)
        if cols.dim() > 1:
            cols = cols.reshape(cols.shape[0], -1).sum(1)
        return cols if self.index is None else cols[self.index].sum(1)

    def entries_per_neuron(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """How many entries each neuron has in a tensor of ``shape`` (float32 ``[K]``)."""
        ones = torch.ones((), dtype=torch.float32).expand(tuple(shape))  # no memory: every stride is 0
        return self._reduce(ones, "abs")

    def entries(self, t: Tensor) -> Tensor:
        """The neuron entries as a ``[K, M]`` matrix (differentiable; used by the autograd paths)."""
        if self.dim == 0:
            return t.reshape(t.shape[0], -1)
        cols = t.transpose(0, 1).reshape(t.shape[1], -1)
        if self.index is None:
            return cols
        return cols[self.index.reshape(-1)].reshape(self.index.shape[0], -1)

    def broadcast(self, s: Tensor, t: Tensor, fill: float = 1.0) -> Tensor:
        """Expand a per-neuron vector ``s`` [K] to a multiplier broadcastable to ``t`` (``fill`` off the neurons)."""
        if self.dim == 0:
            return s.reshape(-1, *([1] * (t.dim() - 1)))
        if self.index is None:
            full = s
        else:
            full = torch.full((t.shape[1],), fill, dtype=s.dtype, device=s.device)
            full[self.index] = s.unsqueeze(1).to(full.dtype)
        return full.reshape(1, -1, *([1] * (t.dim() - 2)))

    # -- writing (in place, routed to the real parameters) ---------------------------------------------------
    def covers_all(self, num_neurons: int) -> bool:
        """Whether every entry of a plain (not low-rank) tensor belongs to one of the ``num_neurons`` of this slot."""
        if self._lowrank() is not None:
            return False
        t = self.tensor()
        if self.dim == 0:
            return t.shape[0] == num_neurons
        if self.index is None:
            return t.shape[1] == num_neurons
        return self.index.numel() == t.shape[1] and self.index.unique().numel() == t.shape[1]

    def _lowrank(self) -> tuple[Tensor, Tensor] | None:
        """The factors of the product this slot reads (None for a plain tensor or a ``factor`` slot)."""
        return low_rank_factors(self.module) if self.param == "weight" and not self.factor else None

    def written(self) -> Tensor:
        """The parameter that :meth:`scale_` writes (U for the rows of a low-rank weight, V for its columns)."""
        if self.factor:
            f = low_rank_factors(self.module)
            assert f is not None
            return f[0] if self.dim == 0 else f[1]
        f = self._lowrank()
        if f is None:
            return self.tensor()
        return f[0] if self.dim == 0 else f[1]

    @torch.no_grad()
    def scale_(self, s: Tensor) -> None:
        """Multiply neuron k's entries by ``s[k]`` in place (on this rank's rows, for a tensor split by rows)."""
        f = self._lowrank()
        if f is None:
            p = self.tensor()
            loc = local(p)
            loc.tensor.mul_(loc.rows_of(self.broadcast(s.to(p.dtype), p)))
            return
        u, v = f
        if self.dim == 0:
            lu = local(u)
            lu.tensor.mul_(lu.rows_of(s.to(u.dtype).unsqueeze(1)))
        else:
            w = torch.empty(self._product_shape(), device="meta")  # the shape, without computing U @ V
            col = self.broadcast(s.to(v.dtype), w).reshape(-1)
            local(v).tensor.mul_(col.repeat_interleave(self._kernel(w)).unsqueeze(0))

    def _product_shape(self) -> tuple[int, ...]:
        plist: Any = self.module.parametrizations["weight"]  # type: ignore[index]
        return tuple(plist[0].weight_shape)

    @torch.no_grad()
    def add_scaled_grad_(self, coef: Tensor, sign: bool = False) -> None:
        """Add ``coef[k] * e`` to the gradient of every entry ``e`` of neuron k (``coef[k] * sign(e)`` with ``sign``).

        This is the closed-form gradient of the seminorm and of weight decay, added without an autograd graph.
        For a low-rank weight the dense gradient G is routed to the factors (U.grad += G V^T, V.grad += U^T G).
        """
        t = self.tensor()
        m = self.broadcast(coef.to(t.dtype), t, fill=0.0)
        f = self._lowrank()
        if f is None:
            leaf = self.written()  # t itself, or the factor V that a [r, in, *kernel] view of t reads
            if leaf.grad is None:
                leaf.grad = torch.zeros_like(leaf)
            lt = local(t)
            grad = local(leaf.grad).tensor.view(lt.tensor.shape)
            m = lt.rows_of(m)
            if sign:
                grad.add_(lt.tensor.sign().mul_(m))
            else:
                grad.addcmul_(lt.tensor, m)
            return
        u, v = f
        uf, vf, tf = full(u), full(v), full(t)  # split by rows (FSDP2): gathered, as the product needs them whole
        g2 = (tf.sign() * m if sign else tf * m).reshape(uf.shape[0], -1)
        for p, g in ((u, g2 @ vf.T), (v, uf.T @ g2)):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            lg = local(p.grad)
            lg.tensor.add_(lg.rows_of(g))

    @torch.no_grad()
    def soft_threshold_(self, tau: float | Tensor) -> None:
        """Elementwise soft-threshold of the neuron entries (the q=1 prox); ``tau`` is a scalar or one per neuron."""
        if self._lowrank() is not None:
            raise NotImplementedError(
                f"q=1 prox on the low-rank weight of '{self.module_name}' is not supported (use q=2)"
            )
        loc = local(self.tensor())
        p = loc.tensor
        thr = loc.rows_of(self.broadcast(tau, self.tensor())) if isinstance(tau, Tensor) and tau.dim() == 1 else tau
        shrunk = p.sign() * (p.abs() - thr).clamp_min(0)
        if self.dim == 0 or self.index is None:
            p.copy_(shrunk)
        else:
            cols = self.index.reshape(-1)
            p[:, cols] = shrunk[:, cols]


class GroupedSlot(Slot):
    """The output weights of neurons read by a grouped convolution (``groups > 1``; depthwise: one input per group).

    A grouped conv with ``G`` groups has weight ``[out, in / G, *kernel]``: input channel ``j`` (group
    ``g = j // (in / G)``, column ``c = j % (in / G)``) is read only by the ``out / G`` filters of group ``g``, so
    neuron k owns the slice ``weight[g*out/G:(g+1)*out/G, c]`` for each input channel ``j`` in ``index[k]`` (channel
    k alone when ``index`` is None).
    """

    def __init__(
        self,
        module: nn.Module,
        module_name: str,
        groups: int,
        index: Tensor | None = None,
        regularized: bool = True,
    ) -> None:
        super().__init__(module, module_name, "weight", 1, index, regularized)
        self.groups = groups

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", groups={self.groups})"

    def _split(self, t: Tensor) -> Tensor:
        """``t`` as ``[G, out/G, in/G, kernel]``."""
        return t.reshape(self.groups, t.shape[0] // self.groups, t.shape[1], -1)

    def reduce_part(self, t: Tensor, how: str = "sq") -> tuple[Tensor, Any]:
        # a rank's rows are not whole filter groups: gathered (an all-gather instead of an all-reduce)
        return self._reduce(full(t), how), None

    def _reduce(self, t: Tensor, how: str) -> Tensor:
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        e = t * t if how == "sq" else t.abs()
        per_channel = self._split(e).sum((1, 3)).reshape(-1)  # [in], channel j = g * in/G + c
        return per_channel if self.index is None else per_channel[self.index].sum(1)

    def entries(self, t: Tensor) -> Tensor:
        g4 = self._split(t)
        cols = g4.permute(0, 2, 1, 3).reshape(g4.shape[0] * g4.shape[2], -1)  # one row per input channel
        if self.index is None:
            return cols
        return cols[self.index.reshape(-1)].reshape(self.index.shape[0], -1)

    def broadcast(self, s: Tensor, t: Tensor, fill: float = 1.0) -> Tensor:
        n_in = t.shape[1] * self.groups
        if self.index is None:
            full = s
        else:
            full = torch.full((n_in,), fill, dtype=s.dtype, device=s.device)
            full[self.index] = s.unsqueeze(1).to(full.dtype)
        per = full.reshape(self.groups, 1, t.shape[1]).expand(self.groups, t.shape[0] // self.groups, t.shape[1])
        return per.reshape(t.shape[0], t.shape[1], *([1] * (t.dim() - 2)))

    def covers_all(self, num_neurons: int) -> bool:
        n_in = self.tensor().shape[1] * self.groups
        if self.index is None:
            return n_in == num_neurons
        return self.index.numel() == n_in and self.index.unique().numel() == n_in

    @torch.no_grad()
    def soft_threshold_(self, tau: float | Tensor) -> None:
        whole = self.tensor()
        loc = local(whole)
        p = loc.tensor
        thr = loc.rows_of(self.broadcast(tau, whole)) if isinstance(tau, Tensor) and tau.dim() == 1 else tau
        shrunk = p.sign() * (p.abs() - thr).clamp_min(0)
        if self.index is None:
            p.copy_(shrunk)
        else:
            owned = loc.rows_of(self.broadcast(torch.ones(self.index.shape[0], device=p.device), whole, fill=0.0)) > 0
            p.copy_(torch.where(owned, shrunk, p))


def is_conv1d(module: nn.Module) -> bool:
    """True for Hugging Face's ``transformers.pytorch_utils.Conv1D`` (a Linear whose weight is ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _out_size(module: Any) -> int:
    """Output features / channels of a Linear, Conv, HF Conv1D or BatchNorm."""
    return int(module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0])


class NeuronGroup:
    """One group of neurons found by :func:`find_neurons`.

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


# ------------------------------------------------------------------------------------------------------------
# discovery
# ------------------------------------------------------------------------------------------------------------
class _Skip(Exception):
    pass


_NOT_HOMOGENEOUS = "is not positively homogeneous (s(a t) != a s(t) for a > 0), so it has no neurons to regularize"
_WEIGHTED = ("linear", "conv", "addmm")  # ops with parameters: reading a value there makes it live


def _parametrized(module: nn.Module) -> bool:
    """Whether any tensor of ``module`` is parametrized.

    A dict lookup: ``parametrize.is_parametrized`` on a plain module raises and catches an AttributeError inside
    ``nn.Module.__getattr__``, a few microseconds per call.
    """
    return "parametrizations" in module._modules


def _per_channel(lab: Tensor, ch: int) -> Tensor | None:
    """``lab`` reduced to ``[batch, channels]`` when it is broadcast (stride 0) along every other dim, else None.

    Such labels are the same at every position, so they need not all be read.
    """
    ch = ch % lab.dim()
    if any(lab.stride(d) != 0 and lab.shape[d] > 1 for d in range(1, lab.dim()) if d != ch):
        return None
    index = tuple(slice(None) if d in (0, ch) else 0 for d in range(lab.dim()))
    per = lab[index]  # [N, C]
    if lab.shape[0] > 1 and lab.stride(0) != 0 and not bool((per == per[:1]).all()):
        return None
    return per


class _Analysis:
    def __init__(self, trace: Trace, root: nn.Module) -> None:
        self.t = trace
        self.root = root
        self.modules = dict(root.named_modules())
        self.n_ops = len(trace.ops)  # another callback's trace may still be recording (and see our own ops)
        self._liveness()

    # -- which values reach the output -----------------------------------------------------------------------
    def _liveness(self) -> None:
        """``self.live[vid]``: the value flows to the output or into a Linear/Conv; ``self.output[vid]``: is one.

        Reads that lead nowhere (a statistic logged in ``forward``, a comparison steering Python control flow) do not
        count as uses: rescaling or removing a neuron cannot change the model's output through them.
        """
        values = self.t.values[: max((v for op in self.t.ops[: self.n_ops] for v in op.outputs), default=-1) + 1]
        if self.t.outputs is not None:
            self.output = [v.vid in self.t.outputs for v in values]
        else:  # unknown results: every floating-point value nothing reads may be one
            self.output = [v.floating and not any(u < self.n_ops for u in v.uses) for v in values]
        live = list(self.output)
        self.op_live = [False] * len(self.t.ops)
        for op in reversed(self.t.ops[: self.n_ops]):
            if op.kind in _WEIGHTED or any(live[o] for o in op.outputs):
                self.op_live[op.index] = True
                for i in op.inputs:
                    live[i] = True
        self.live = live

    def live_uses(self, vid: int) -> list[int]:
        return [u for u in self.t.values[vid].uses if u < self.n_ops and self.op_live[u]]

    def module_of(self, op: Op, types: tuple[type, ...]) -> tuple[str, Any]:
        name = op.module
        found = self.modules.get(name) if name is not None else None
        ok = found is not None and (isinstance(found, types) or (op.kind == "addmm" and is_conv1d(found)))
        if name is None or not ok:
            raise _Skip(f"'{op.name}' is called outside a {types[0].__name__.rstrip('123d')} module ({name})")
        mod: Any = found
        if self.t.calls.get(name, 0) != 1:
            raise _Skip(f"module '{name}' is called {self.t.calls.get(name, 0)} times (shared weights)")
        if not _parametrized(mod):
            return name, mod
        for param in ("weight", "bias"):
            if parametrize.is_parametrized(mod, param) and (param == "bias" or low_rank_factors(mod) is None):
                raise _Skip(
                    f"the {param} of '{name}' has a parametrization lightning_bv cannot rescale in place "
                    f"(only apply_low_rank's is understood)"
                )
        if isinstance(mod, CONVS) and mod.groups != 1 and low_rank_factors(mod) is not None:
            raise _Skip(f"'{name}' is a low-rank grouped convolution")
        return name, mod

    def data_vid(self, op: Op) -> int | None:
        """The activation input of a weighted op (``addmm(bias, x, weight)`` reads ``x``)."""
        if op.kind == "addmm":
            x = op.args[1] if len(op.args) > 1 else None
            return x.vid if isinstance(x, Ref) else None
        return op.data_input()

    def weighted_op(self, vid: int) -> Op | None:
        """The Linear/Conv/Conv1D call that made value ``vid`` (seeing through the reshape inside HF ``Conv1D``)."""
        p = self.t.values[vid].producer
        if p is None:
            return None
        op = self.t.ops[p]
        if op.kind in ("linear", "conv"):
            return op
        if op.kind == "layout" and op.name in ("view", "reshape") and op.module is not None:
            inner = op.data_input()
            ip = self.t.values[inner].producer if inner is not None else None
            core = self.t.ops[ip] if ip is not None else None
            mod = self.modules.get(op.module)
            if (
                core is not None
                and core.kind == "addmm"
                and core.module == op.module
                and mod is not None
                and is_conv1d(mod)
                and len(self.live_uses(core.outputs[0])) == 1
            ):
                return core
        return op if op.kind == "addmm" else None

    def through_pools(self, vid: int | None) -> int | None:
        """Step back from ``vid`` through pools and dropout (per channel) that are the only readers of their input."""
        while vid is not None:
            p = self.t.values[vid].producer
            op = self.t.ops[p] if p is not None else None
            inner = op.data_input() if op is not None else None
            if op is None or op.kind not in ("pool", "dropout") or inner is None or len(self.live_uses(inner)) != 1:
                return vid
            if op.kind == "pool" and len(self.t.values[inner].shape) != len(self.t.values[vid].shape):
                return vid
            vid = inner
        return vid

    # -- producer side ---------------------------------------------------------------------------------------
    def producers(self, vid: int) -> list[tuple[str, Any, str | None, Any]]:
        value = self.t.values[vid]
        if value.producer is None:
            raise _Skip("the pre-activation comes straight from an input or a parameter-free path")
        if len(self.live_uses(vid)) != 1:
            raise _Skip("the pre-activation (or a branch of its sum) is also read elsewhere, e.g. by a residual stream")
        op = self.t.ops[value.producer]
        if op.kind == "norm":
            bn_name, bn = self.module_of(op, BATCH_NORMS)
            if bn.weight is None:
                raise _Skip(f"BatchNorm '{bn_name}' has affine=False (no gamma to rescale)")
            inner = self.through_pools(op.data_input())
            pop = self.weighted_op(inner) if inner is not None else None
            if pop is not None and len(self.live_uses(inner)) == 1:  # type: ignore[arg-type]
                try:
                    name, mod = self.module_of(pop, WEIGHTED)
                    return [(name, mod, bn_name, bn)]
                except _Skip:
                    pass
            # the BatchNorm alone: input scale |gamma_k|, bias beta_k (a concat, an input, a tensor read elsewhere)
            return [(bn_name, bn, bn_name, bn)]
        wop = self.weighted_op(vid)
        if wop is not None:
            name, mod = self.module_of(wop, WEIGHTED)
            return [(name, mod, None, None)]
        if op.kind == "add":
            if len(op.inputs) != 2 or op.kwargs.get("alpha", 1) != 1:
                raise _Skip("the pre-activation adds a constant (not positively homogeneous)")
            out = []
            for v in op.inputs:
                p = self.t.values[v].producer
                if p is None or (self.t.ops[p].kind not in ("norm", "add") and self.weighted_op(v) is None):
                    raise _Skip("the pre-activation also flows through a parameter-free path (identity skip)")
                out += self.producers(v)
            return out
        raise _Skip(f"the pre-activation comes from unsupported op '{op.name}'")

    # -- consumer side ---------------------------------------------------------------------------------------
    def consumers(self, act: Op, k: int, ch_dim: int) -> list[tuple[str, Any, Tensor]]:
        out_vid = act.outputs[0]
        shape = self.t.values[out_vid].shape
        if len(shape) <= ch_dim % len(shape) or shape[ch_dim] != k:
            raise _Skip(f"activation shape {tuple(shape)} does not have the producer's {k} channels at dim {ch_dim}")
        view = [1] * len(shape)
        view[ch_dim] = k
        own = torch.arange(1, k + 1, dtype=torch.float32).reshape(view).expand(shape)
        labels = {out_vid: own}
        last = max(self.t.values[out_vid].uses, default=-1)  # no op after the last read of a label can reach one
        found: list[tuple[str, Any, Tensor]] = []
        for op in self.t.ops[act.index + 1 : self.n_ops]:
            if op.index > last:
                break
            if not self.op_live[op.index]:
                continue  # a read whose result never reaches the output
            reached = [v for v in op.inputs if v in labels]
            if not reached:
                continue
            if op.kind in _WEIGHTED:
                if self.data_vid(op) not in labels or len(reached) > 1:
                    raise _Skip(f"the activation is used as a weight of '{op.name}'")
                lab = labels[reached[0]]
                found.append(self.consumer(op, lab, ch_dim if lab is own else None))
                continue
            new = self.propagate(op, labels)
            for vid, lab in zip(op.outputs, new):
                labels[vid] = lab
                last = max(last, *self.t.values[vid].uses, -1)
        for vid in labels:
            if self.output[vid]:
                raise _Skip("the activation reaches the model output without a Linear/Conv in between")
        if not found:
            raise _Skip("no Linear/Conv reads the activation")
        return found

    def propagate(self, op: Op, labels: dict[int, Tensor]) -> list[Tensor]:
        def sub(obj: Any) -> Any:
            if isinstance(obj, Ref):
                return labels[obj.vid] if obj.vid in labels else torch.zeros(obj.shape)
            if isinstance(obj, (list, tuple)):
                return type(obj)(sub(o) for o in obj)
            return obj

        if op.kind == "add":
            raise _Skip(f"the activation output also flows through a parameter-free path ('{op.name}', identity skip)")
        if op.kind in ("layout", "cat"):
            out = op.func(*sub(op.args), **sub(op.kwargs))
            return list(out) if isinstance(out, (list, tuple)) else [out]
        x = labels[op.inputs[0]]
        if op.kind == "dropout":
            return [x]
        if op.kind == "pool":  # channel-preserving: every output position of channel c carries c's label
            shape = self.t.values[op.outputs[0]].shape
            per = _per_channel(x, 1)
            if per is None:
                flat = x.reshape(*x.shape[:2], -1)
                if not bool((flat.amax(-1) == flat.amin(-1)).all()):
                    raise _Skip(f"'{op.name}' pools over positions of different neurons")
                per = flat[..., 0]
            return [per.reshape(*per.shape[:2], *([1] * (len(shape) - 2))).expand(shape)]
        if op.kind == "reduce":
            dim = op.args[1] if len(op.args) > 1 else op.kwargs.get("dim")
            keep = op.args[2] if len(op.args) > 2 else op.kwargs.get("keepdim", False)
            if dim is None:
                dim = tuple(range(x.dim()))
            hi, lo = x.amax(dim, keepdim=keep), x.amin(dim, keepdim=keep)
            return [torch.where(hi == lo, hi, torch.full_like(hi, -1.0))]
        raise _Skip(f"the activation output is read by unsupported op '{op.name}'")

    def consumer(self, op: Op, lab: Tensor, own_dim: int | None = None) -> tuple[str, Any, Tensor]:
        """Module, name and the input features of each neuron (``[K, M]``) of a Linear/Conv reading labels ``lab``.

        ``own_dim``: ``lab`` holds the activation's own labels, neuron k at index k of that dim.
        """
        name, mod = self.module_of(op, WEIGHTED)
        ch = -1 if isinstance(mod, nn.Linear) or is_conv1d(mod) else 1
        if own_dim is not None and ch % lab.dim() == own_dim % lab.dim():  # the usual case, without reading labels
            return name, mod, torch.arange(lab.shape[ch]).unsqueeze(1)
        fast = _per_channel(lab, ch)  # a label broadcast over positions (the usual case): no need to read them all
        if fast is not None:
            first = fast.reshape(-1, fast.shape[-1])[0] if ch == -1 else fast[0]
        else:
            per = lab.reshape(-1, lab.shape[-1]) if ch == -1 else lab.transpose(0, 1).reshape(lab.shape[1], -1).T
            if not bool((per == per[0]).all()):
                raise _Skip(f"consumer '{name}' reads positions that mix several neurons")
            first = per[0]
        if bool((first < 0).any()):
            raise _Skip(f"consumer '{name}' reads positions that mix several neurons")
        feat = first.long()
        k = int(feat.shape[0])
        if torch.equal(feat, torch.arange(1, k + 1)):  # the usual case: input feature j is neuron j
            return name, mod, torch.arange(k).unsqueeze(1)
        cols = torch.nonzero(feat > 0).flatten()
        order = torch.argsort(feat[cols], stable=True)
        cols, owners = cols[order], feat[cols][order]
        counts = torch.bincount(owners - 1, minlength=int(feat.max()))
        if counts.numel() == 0 or not bool((counts == counts[0]).all()) or counts[0] == 0:
            raise _Skip(f"consumer '{name}' reads the neurons unevenly (some channels are sliced away)")
        return name, mod, cols.reshape(counts.numel(), -1)

    def consumer_slot(self, name: str, mod: Any, idx: Tensor) -> Slot:
        reg = not is_null_space(mod)
        n_in = int(mod.weight.shape[0] if is_conv1d(mod) else mod.weight.shape[1])
        groups = int(getattr(mod, "groups", 1))
        n_in *= groups
        trivial = (
            idx.shape[1] == 1 and idx.shape[0] == n_in and bool((idx.flatten() == torch.arange(idx.shape[0])).all())
        )
        if is_conv1d(mod):  # weight [in, out]: neuron k owns input row k
            if not trivial:
                raise _Skip(f"consumer '{name}' (Conv1D) reads the neurons in another order or in part")
            return Slot(mod, name, "weight", 0, regularized=reg)
        if groups != 1:
            return GroupedSlot(mod, name, groups, None if trivial else idx, regularized=reg)
        return Slot(mod, name, "weight", 1, None if trivial else idx, regularized=reg)

    # -- groups ----------------------------------------------------------------------------------------------
    def group(self, act: Op) -> NeuronGroup:
        pre = act.data_input()
        if pre is None:
            raise _Skip("activation input is not a recorded tensor")
        prods = self.producers(pre)
        k = _out_size(prods[0][1])
        if any(_out_size(m) != k for _, m, _, _ in prods):
            raise _Skip("summed producers have different widths")
        first = prods[0][1]
        ch_dim = -1 if isinstance(first, nn.Linear) or is_conv1d(first) else 1
        cons = self.consumers(act, k, ch_dim)
        w_slots, b_slots, v_slots = [], [], []
        for name, mod, bn_name, bn in sorted(prods, key=lambda p: p[0]):
            reg = not is_null_space(mod)
            owner, owner_name = (bn, str(bn_name)) if bn is not None else (mod, name)
            w_dim = 1 if is_conv1d(owner) else 0  # a Conv1D's neuron k owns weight column k
            w_slots.append(Slot(owner, owner_name, "weight", w_dim, regularized=reg))
            if owner.bias is not None:
                b_slots.append(Slot(owner, owner_name, "bias", 0, regularized=False))
        names = set()
        for name, mod, idx in sorted(cons, key=lambda c: c[0]):
            if name in names:
                raise _Skip(f"consumer '{name}' reads the activation twice")
            names.add(name)
            v_slots.append(self.consumer_slot(name, mod, idx))
        producers = sorted(p[0] for p in prods)
        norms = [bn for _, _, bn, _ in sorted(prods, key=lambda p: p[0])]
        slope = act.args[1] if len(act.args) > 1 else act.kwargs.get("weight")
        per_neuron = isinstance(slope, Ref) and slope.shape.numel() > 1  # PReLU(num_parameters=K): one slope each
        return NeuronGroup(
            "+".join(producers),
            producers,
            norms,
            ACTIVATIONS[act.name],
            sorted(names),
            k,
            w_slots,
            b_slots,
            v_slots,
            activation_module=(act.module or "") if per_neuron else None,
        )

    def non_homogeneous(self, op: Op) -> str:
        """The skip reason of a non-homogeneous activation, naming its module class when it has one (``ReLU6``)."""
        mod = self.modules.get(op.module) if op.module is not None else None
        kind = op.name.rstrip("_")
        if mod is not None and "activation" in type(mod).__module__:
            kind = type(mod).__name__
        return f"{kind} {_NOT_HOMOGENEOUS}"


def own_factors(groups: Sequence[NeuronGroup]) -> list[str]:
    """Let groups own the factors of every low-rank layer that sits between two of them, in place.

    A low-rank layer ``W = U V`` that is a consumer of one group (its columns) and the producer of another (its rows,
    no BatchNorm between) would be shared by both if read as the product. Instead, the consuming side's ``v_k`` become
    the columns of ``V`` and the producing side's ``w_j`` the rows of ``U`` (``Slot.factor``): no tensor is shared, and
    the layer's rank components need no group of their own (the neurons' penalty drives the rank down). Returns the
    names of the layers read that way.
    """
    roles: dict[str, set[int]] = {}
    for g in groups:
        for s in g.w_slots + g.v_slots:
            if s.param == "weight" and s.regularized and s._lowrank() is not None:
                roles.setdefault(s.module_name, set()).add(s.dim)
    between = {name for name, dims in roles.items() if dims == {0, 1}}
    for g in groups:
        g.w_slots = tuple(s.owning_factor() if s.module_name in between and s.param == "weight" else s
                          for s in g.w_slots)  # fmt: skip
        g.v_slots = tuple(s.owning_factor() if s.module_name in between and s.param == "weight" else s
                          for s in g.v_slots)  # fmt: skip
    return sorted(between)


def shared_weights(groups: Sequence[NeuronGroup]) -> list[str]:
    """Names of the plain Linear/Conv layers whose weight is one group's input weights and another's output weights.

    That is the hidden matrix of a plain Linear-ReLU-Linear-ReLU chain: its columns belong to the neurons before it,
    its rows to the neurons after it, so no per-neuron rescaling or proximal step is exact for either group.
    :func:`lightning_bv.lift_shared_weights` writes such a weight as a full-rank product ``A B`` instead.
    """
    rows: set[str] = set()
    cols: set[str] = set()
    for g in groups:
        for s in g.w_slots:
            if s.param == "weight" and s.dim == 0 and s.regularized and s._lowrank() is None and not s.factor:
                rows.add(s.module_name)
        for s in g.v_slots:
            if s.param == "weight" and s.regularized and s._lowrank() is None and not s.factor:
                cols.add(s.module_name)
    return sorted(rows & cols)


def _low_rank_groups(modules: Mapping[str, nn.Module]) -> list[NeuronGroup]:
    groups = []
    for name, mod in modules.items():
        f = low_rank_factors(mod) if _parametrized(mod) else None
        if f is None:
            continue
        r = f[0].shape[1]
        w = Slot(mod, name, FACTOR_V, 0)
        v = Slot(mod, name, FACTOR_U, 1)
        groups.append(NeuronGroup(f"{name}:rank", [name], [None], "identity", [name], r, [w], [], [v]))
    return groups


def analyze(trace: Trace, root: nn.Module, targets: Targets = None, exclude: Targets = None) -> NeuronGroups:
    """Turn a recorded trace of ``root`` into neuron groups (used by :func:`find_neurons` and the callbacks)."""
    a = _Analysis(trace, root)
    groups: list[NeuronGroup] = []
    skipped: list[tuple[str, str]] = []
    for op in trace.ops:
        if op.kind not in ("act", "nonhom"):
            continue
        where = op.module or "<root>"
        label = f"{op.name} (op {op.index} in '{where}')"
        if op.kind == "nonhom":
            skipped.append((label, a.non_homogeneous(op)))
            continue
        try:
            groups.append(a.group(op))
        except _Skip as why:
            skipped.append((label, str(why)))
    rank_groups = _low_rank_groups(a.modules)
    if targets is not None or exclude is not None:
        candidates = list(dict.fromkeys(p for g in groups + rank_groups for p in (*g.producers, g.name)))
        picked = set(select_names(candidates, targets, exclude))
        kept = []
        for g in groups + rank_groups:
            if g.name in picked or any(p in picked for p in g.producers):
                kept.append(g)
            else:
                skipped.append((g.name, "not selected by targets/exclude"))
        groups = [g for g in kept if g.activation != "identity"]
        rank_groups = [g for g in kept if g.activation == "identity"]
    owned = set(own_factors(groups))  # a low-rank layer between two selected groups: its factors are theirs
    groups += [g for g in rank_groups if g.producer not in owned]
    return NeuronGroups(groups, skipped)


def find_neurons(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...] | Mapping[str, Any],
    *,
    targets: Targets = None,
    exclude: Targets = None,
) -> NeuronGroups:
    """Find every group of positively homogeneous neurons (ReLU, LeakyReLU, PReLU) in ``model``.

    Runs ``model(example_input)`` (``model(*example_input)`` for a tuple, ``model(**example_input)`` for a dict, as
    Hugging Face models take ``input_ids=...``) once and reads the real dataflow, so models with data-dependent Python
    control flow work. Only reads whose results reach the output (or another layer's input) count: a statistic
    logged in ``forward`` or a comparison that picks a branch does not make a group unsafe. The model is left as it
    was: buffers (BatchNorm running statistics) are copied back in place and the random number generator state is
    restored.

    Args:
        model: any ``nn.Module``.
        example_input: a tensor (floating point, or integer token ids), a tuple of positional arguments, or a dict of
            keyword arguments.
        targets: keep only groups whose producer (or name) matches: a str is a regex on the full module name, a
            list matches exactly or by ``.suffix``.
        exclude: drop groups matching this rule (same form); wins over ``targets``.

    Returns:
        NeuronGroups: the groups, with ``.skipped`` listing every activation left out and why (non-homogeneous
        activations such as ReLU6 or GELU included: :meth:`NeuronGroups.found_instead` summarizes them).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> groups = find_neurons(net, torch.randn(4, 3))
        >>> [(g.producer, g.consumers, g.num_neurons) for g in groups]
        [('0', ('2',), 8), ('2', ('4',), 8)]

    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, (Tensor, tuple, Mapping)):
        raise TypeError(
            "`example_input` must be a tensor, a tuple of positional arguments or a dict of keyword arguments, got "
            f"{type(example_input).__name__}"
        )
    if isinstance(example_input, Mapping):
        args: tuple[Any, ...] = ()
        kwargs = dict(example_input)
    else:
        args, kwargs = example_input if isinstance(example_input, tuple) else (example_input,), {}
    trace = Trace(model)
    with _buffers_restored(model), torch.random.fork_rng(devices=[]), torch.enable_grad():
        trace.start()
        try:
            trace.mark_outputs(model(*args, **kwargs))
        finally:
            trace.stop()
    return analyze(trace, model, targets, exclude)


@contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Copy every buffer back in place on exit.

    Not through ``load_state_dict``: a plain dict has no ``_metadata``, and modules whose ``_load_from_state_dict``
    reads its version (torchvision's MNASNet) refuse it.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)
