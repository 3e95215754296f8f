"""Slots: where the entries of a group's neurons live in one tensor, and the in-place kernels that read and write them.

A :class:`Slot` holds the module itself and reads ``module.weight`` at call time, so it stays valid after a low-rank
parametrization and under DDP; :class:`GroupedSlot` is the output weights of neurons read by a grouped convolution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_bv._layers import low_rank_factors
from lightning_bv._sharding import all_reduce_, full, local


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
                "RBVRegularization's modes, which need no gradient of the norms"
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
