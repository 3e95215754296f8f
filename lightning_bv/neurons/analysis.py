"""The analysis of a recorded trace: which values reach the output, and each neuron group's producers and consumers.

:class:`_Analysis` reads one :class:`~lightning_bv._trace.Trace` and turns an activation op into a
:class:`~lightning_bv.neurons.group.NeuronGroup`, or raises :class:`_Skip` with the reason it cannot.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_bv._layers import BATCH_NORMS, CONVS, WEIGHTED, is_null_space, low_rank_factors
from lightning_bv._trace import ACTIVATIONS, Op, Ref, Trace
from lightning_bv.neurons.group import _NOT_HOMOGENEOUS, NeuronGroup
from lightning_bv.neurons.slot import GroupedSlot, Slot, _out_size, is_conv1d


class _Skip(Exception):
    pass


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
