"""The shrinkers of the layer types the library knows (pure torch).

Linear, ConvNd (grouped and depthwise too), Hugging Face ``Conv1D``, any BatchNorm, PReLU, and the low-rank factors
of a Linear/Conv.

:mod:`lightning_bv.transforms.shrinkers` registers them; see :class:`~lightning_bv.transforms.shrinkers.LayerShrinker`
for what each method does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_bv._layers import (
    FACTOR_U,
    FACTOR_V,
    U_KEY,
    V_KEY,
    low_rank_factors,
    low_rank_weight,
    set_low_rank_factors,
    weight_parametrizations,
)
from lightning_bv.transforms._shrinker import AXIS_LINEAR, CannotShrink, LayerShrinker, ShrinkPlan, fresh


class LinearShrinker(LayerShrinker):
    """``nn.Linear`` (weight ``[out, in]``); the base of the convolutions' shrinkers.

    Subclass it for a layer that has a Linear's ``weight``, ``bias``, ``out_features`` and ``in_features``: list
    the extra tensors in :attr:`parameters` / :attr:`buffers` and extend :meth:`plan` and :meth:`resize`.
    """

    out_attr = "out_features"
    in_attr = "in_features"

    def variant(self, module: nn.Module) -> LayerShrinker:
        return LOW_RANK if low_rank_factors(module) is not None else self

    def size(self, module: nn.Module, axis: str) -> int:
        weight = cast(Tensor, module.weight)
        if axis == "out":
            return int(weight.shape[0])
        if axis == "in":
            return int(weight.shape[1]) * int(getattr(module, "groups", 1))
        return super().size(module, axis)

    def plan(self, module: nn.Module, keep: Mapping[str, Tensor], plan: ShrinkPlan) -> None:
        out, inp = keep.get("out"), keep.get("in")
        plan.param(module, "weight", (out, inp))
        plan.param(module, "bias", (out,))
        self.plan_sizes(module, out, inp, plan)

    def plan_sizes(self, module: nn.Module, out: Tensor | None, inp: Tensor | None, plan: ShrinkPlan) -> None:
        """Plan the new ``out``/``in`` size attributes."""
        if out is not None:
            plan.set(module, self.out_attr, int(out.numel()))
        if inp is not None:
            plan.set(module, self.in_attr, int(inp.numel()))

    def resize(self, module: nn.Module, saved: Mapping[str, Tensor], grow: bool = False) -> bool:
        m: Any = module
        w = saved.get("weight")
        kernel = tuple(m.weight.shape[2:])
        if w is None or w.shape == m.weight.shape or w.dim() < 2 or tuple(w.shape[2:]) != kernel:
            return False
        out, inp = int(w.shape[0]), int(w.shape[1])
        if (out > int(m.weight.shape[0]) or inp > int(m.weight.shape[1])) and not grow:
            return False
        m.weight = fresh(m.weight, tuple(w.shape))
        self.resize_rest(m, out, inp)
        return True

    def resize_rest(self, module: Any, out: int, inp: int) -> None:
        """After the weight: the bias and the size attributes."""
        if module.bias is not None:
            module.bias = fresh(module.bias, (out,))
        setattr(module, self.out_attr, out)
        setattr(module, self.in_attr, inp)


class ConvShrinker(LinearShrinker):
    """``nn.Conv1d/2d/3d`` with ``groups=1`` (weight ``[out, in, *kernel]``)."""

    out_attr = "out_channels"
    in_attr = "in_channels"

    def variant(self, module: nn.Module) -> LayerShrinker:
        if int(cast(Any, module).groups) != 1:
            return GROUPED_CONV
        return super().variant(module)


class GroupedConvShrinker(ConvShrinker):
    """A grouped convolution (``groups > 1``; depthwise-like: one input channel per group).

    Every group keeps as many input and as many output channels, at least one each; a depthwise-like conv loses
    whole groups only (an input channel with all the output channels that read it), and its ``groups`` shrink.
    """

    def variant(self, module: nn.Module) -> LayerShrinker:
        return self

    def check_removal(self, name: str, module: nn.Module, removed: Mapping[str, Tensor]) -> None:
        m: Any = module
        groups, n_in, n_out = int(m.groups), int(m.in_channels), int(m.out_channels)
        ipg, opg = n_in // groups, n_out // groups
        r_in = removed.get("in", torch.zeros(n_in, dtype=torch.bool)).reshape(groups, ipg).sum(1)
        r_out = removed.get("out", torch.zeros(n_out, dtype=torch.bool)).reshape(groups, opg).sum(1)
        whole = (r_in == ipg) & (r_out == opg)
        if ipg == 1:
            if bool((~whole & ((r_in > 0) | (r_out > 0))).any()):
                raise CannotShrink(
                    f"'{name}' is a depthwise convolution (groups={groups}): an input channel can only be removed "
                    f"together with the {opg} output channel(s) that read it, and those only with it"
                )
            if bool(whole.all()):
                raise CannotShrink(f"removing every channel of the depthwise convolution '{name}'")
            return
        if (
            bool((r_in == ipg).any() | (r_out == opg).any())
            or len(set(r_in.tolist())) > 1
            or len(set(r_out.tolist())) > 1
        ):
            raise CannotShrink(
                f"'{name}' is a grouped convolution (groups={groups}): every group must keep the same number of input "
                "and of output channels, at least one each"
            )

    def plan(self, module: nn.Module, keep: Mapping[str, Tensor], plan: ShrinkPlan) -> None:
        m: Any = module
        out, inp = keep.get("out"), keep.get("in")
        groups, n_in, n_out = int(m.groups), int(m.in_channels), int(m.out_channels)
        ipg, opg = n_in // groups, n_out // groups
        removed_in, removed_out = self.removed(m, keep, "in"), self.removed(m, keep, "out")
        if "in" not in keep or ipg == 1:  # depthwise: whole groups go, the one column stays
            plan.param(m, "weight", (out, None))
        else:  # each group may keep different input channels (as many in each): one row of columns per kept row
            kept = ~removed_in.reshape(groups, ipg)
            cols = torch.stack([torch.nonzero(kept[g]).flatten() for g in range(groups)])
            rows = torch.arange(n_out) if out is None else out
            plan.param(m, "weight", (out, cols[rows // opg]))
        whole = removed_in.reshape(groups, -1).all(1) & removed_out.reshape(groups, -1).all(1)
        if bool(whole.any()):
            plan.set(m, "groups", groups - int(whole.sum()))
        plan.param(m, "bias", (out,))
        self.plan_sizes(m, out, inp, plan)

    def resize(self, module: nn.Module, saved: Mapping[str, Tensor], grow: bool = False) -> bool:
        """Resize the way compaction shrinks: a depthwise-like conv loses whole groups, any other keeps its groups."""
        m: Any = module
        w = saved.get("weight")
        if w is None or w.shape == m.weight.shape or w.dim() != m.weight.dim() or w.shape[2:] != m.weight.shape[2:]:
            return False
        groups, ipg, opg = int(m.groups), int(m.weight.shape[1]), int(m.out_channels) // int(m.groups)
        out, ipg_new = int(w.shape[0]), int(w.shape[1])
        new_groups = out // opg if ipg == 1 else groups
        if out > m.out_channels or ipg_new > ipg or out % new_groups or (ipg == 1 and (ipg_new != 1 or out % opg)):
            return False
        m.weight = fresh(m.weight, tuple(w.shape))
        if m.bias is not None:
            m.bias = fresh(m.bias, (out,))
        m.groups, m.out_channels, m.in_channels = new_groups, out, new_groups * ipg_new
        return True


class LowRankShrinker(LinearShrinker):
    """A Linear/Conv whose weight is ``U @ V`` (:func:`~lightning_bv.apply_low_rank`): its factors shrink.

    ``"out"`` takes rows of ``U``, ``"in"`` the columns of ``V`` of each kept input channel (all kernel positions),
    ``"rank"`` columns of ``U`` and rows of ``V`` (a group of rank-1 components).
    """

    parameters = ("bias",)  # the weight's factors live in its parametrizations

    def variant(self, module: nn.Module) -> LayerShrinker:
        return self

    def axis(self, param: str, dim: int) -> str | None:
        return {**AXIS_LINEAR, (FACTOR_V, 0): "rank", (FACTOR_U, 1): "rank"}.get((param, dim))

    def size(self, module: nn.Module, axis: str) -> int:
        if axis == "rank":
            return int(cast(tuple[Tensor, Tensor], low_rank_factors(module))[0].shape[1])
        return super().size(module, axis)

    def _attrs(self, module: nn.Module) -> tuple[str, str]:
        linear = isinstance(module, nn.Linear)
        return ("out_features", "in_features") if linear else ("out_channels", "in_channels")

    def plan(self, module: nn.Module, keep: Mapping[str, Tensor], plan: ShrinkPlan) -> None:
        m: Any = module
        out, inp, rank = keep.get("out"), keep.get("in"), keep.get("rank")
        _, v = cast(tuple[Tensor, Tensor], low_rank_factors(m))
        kernel = v.shape[1] // m.weight.shape[1]
        cols = None if inp is None else (inp[:, None] * kernel + torch.arange(kernel)).flatten()
        plist = weight_parametrizations(m)
        plan.param(plist, U_KEY, (out, rank))
        plan.param(plist, V_KEY, (rank, cols))
        shape = list(m.weight.shape)
        plan.param(m, "bias", (out,))
        out_attr, in_attr = self._attrs(m)
        if out is not None:
            plan.set(m, out_attr, int(out.numel()))
        if inp is not None:
            plan.set(m, in_attr, int(inp.numel()))
        shape[0] = shape[0] if out is None else int(out.numel())
        shape[1] = shape[1] if inp is None else int(inp.numel())
        lrw = cast(nn.Module, low_rank_weight(m))
        plan.set(lrw, "weight_shape", tuple(shape))
        if rank is not None:
            plan.set(lrw, "rank", int(rank.numel()))

    def resize(self, module: nn.Module, saved: Mapping[str, Tensor], grow: bool = False) -> bool:
        m: Any = module
        factors = cast(tuple[Tensor, Tensor], low_rank_factors(m))
        kernel = tuple(m.weight.shape[2:])
        u, v = saved.get(FACTOR_U), saved.get(FACTOR_V)
        if u is None or v is None or (u.shape, v.shape) == (factors[0].shape, factors[1].shape):
            return False
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0] or v.shape[1] % max(math.prod(kernel), 1):
            return False
        out, inp = int(u.shape[0]), int(v.shape[1]) // max(math.prod(kernel), 1)
        if (out > int(m.weight.shape[0]) or inp > int(m.weight.shape[1])) and not grow:
            return False
        set_low_rank_factors(m, fresh(factors[0], tuple(u.shape)), fresh(factors[1], tuple(v.shape)))
        lrw = cast(Any, low_rank_weight(m))
        lrw.weight_shape, lrw.rank = (out, inp, *kernel), int(u.shape[1])
        if m.bias is not None:
            m.bias = fresh(m.bias, (out,))
        out_attr, in_attr = self._attrs(m)
        setattr(m, out_attr, out)
        setattr(m, in_attr, inp)
        return True


class Conv1DShrinker(LayerShrinker):
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (a Linear whose weight is ``[in, out]``; ``nf``, ``nx``)."""

    def axis(self, param: str, dim: int) -> str | None:
        return {("weight", 1): "out", ("bias", 0): "out", ("weight", 0): "in"}.get((param, dim))

    def size(self, module: nn.Module, axis: str) -> int:
        weight = cast(Tensor, module.weight)
        if axis in ("out", "in"):
            return int(weight.shape[1] if axis == "out" else weight.shape[0])
        return super().size(module, axis)

    def plan(self, module: nn.Module, keep: Mapping[str, Tensor], plan: ShrinkPlan) -> None:
        out, inp = keep.get("out"), keep.get("in")
        plan.param(module, "weight", (inp, out))
        plan.param(module, "bias", (out,))
        if out is not None:
            plan.set(module, "nf", int(out.numel()))
        if inp is not None and hasattr(module, "nx"):
            plan.set(module, "nx", int(inp.numel()))

    def resize(self, module: nn.Module, saved: Mapping[str, Tensor], grow: bool = False) -> bool:
        m: Any = module
        w = saved.get("weight")
        if w is None or w.shape == m.weight.shape or w.dim() != 2 or w.shape[0] > m.nx or w.shape[1] > m.nf:
            return False
        m.weight, m.bias = fresh(m.weight, tuple(w.shape)), fresh(m.bias, (int(w.shape[1]),))
        m.nx, m.nf = int(w.shape[0]), int(w.shape[1])
        return True


class BatchNormShrinker(LayerShrinker):
    """Any BatchNorm (``_BatchNorm``, SyncBatchNorm too): ``weight``, ``bias`` and the running statistics."""

    role = "norm"
    buffers = ("running_mean", "running_var", "num_batches_tracked")

    def size(self, module: nn.Module, axis: str) -> int:
        if axis == "out":
            return int(cast(Any, module).num_features)
        return super().size(module, axis)

    def plan(self, module: nn.Module, keep: Mapping[str, Tensor], plan: ShrinkPlan) -> None:
        out = keep.get("out")
        plan.param(module, "weight", (out,))
        plan.param(module, "bias", (out,))
        for buf in ("running_mean", "running_var"):
            plan.buffer(module, buf, (out,))
        if out is not None:
            plan.set(module, "num_features", int(out.numel()))

    def resize(self, module: nn.Module, saved: Mapping[str, Tensor], grow: bool = False) -> bool:
        m: Any = module
        w = next((saved[k] for k in ("weight", "running_mean") if k in saved), None)
        if w is None or w.dim() != 1 or w.shape[0] == m.num_features or (w.shape[0] > m.num_features and not grow):
            return False
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if getattr(m, attr) is not None:
                setattr(m, attr, fresh(getattr(m, attr), (int(w.shape[0]),)))
        m.num_features = int(w.shape[0])
        return True


class PReLUShrinker(LayerShrinker):
    """``nn.PReLU`` with one slope per neuron (``num_parameters=K``)."""

    role = "activation"
    parameters = ("weight",)

    def size(self, module: nn.Module, axis: str) -> int:
        if axis == "out":
            return int(cast(Any, module).num_parameters)
        return super().size(module, axis)

    def plan(self, module: nn.Module, keep: Mapping[str, Tensor], plan: ShrinkPlan) -> None:
        out = keep.get("out")
        plan.param(module, "weight", (out,))
        if out is not None:
            plan.set(module, "num_parameters", int(out.numel()))

    def resize(self, module: nn.Module, saved: Mapping[str, Tensor], grow: bool = False) -> bool:
        m: Any = module
        w = saved.get("weight")
        if w is None or w.shape == m.weight.shape or w.dim() != 1 or (w.shape[0] > m.weight.shape[0] and not grow):
            return False
        m.weight, m.num_parameters = fresh(m.weight, tuple(w.shape)), int(w.shape[0])
        return True


GROUPED_CONV = GroupedConvShrinker()
LOW_RANK = LowRankShrinker()
CONV1D = Conv1DShrinker()
