"""Record the real dataflow of one forward pass, op by op (private).

A :class:`torch.overrides.TorchFunctionMode` sees every top-level torch call (``F.linear``, ``F.relu``,
``torch.cat``, ``x.view``, ``x + y``...) with its real arguments, and module hooks tell which module made each
call. Because the model really runs, Python control flow that depends on the data is followed as it happens
(torch.fx cannot trace such models). The trace is a list of :class:`Op` in execution order (hence topological);
tensors become integer value ids, and in-place ops give their result a fresh id.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

ACTIVATIONS = {"relu": "relu", "relu_": "relu", "leaky_relu": "leaky_relu", "leaky_relu_": "leaky_relu"}
ACTIVATIONS.update({"prelu": "prelu"})
# activations that are not positively homogeneous (s(a t) != a s(t)): reported as skipped, never grouped
NON_HOMOGENEOUS = {
    *("relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "hardswish", "hardswish_", "mish", "elu", "elu_"),
    *("selu", "selu_", "celu", "celu_", "softplus", "tanh", "tanh_", "sigmoid", "sigmoid_", "hardsigmoid"),
    *("hardsigmoid_", "logsigmoid", "softsign", "tanhshrink", "rrelu", "rrelu_", "glu"),
}
LINEAR = {"linear"}
CONV = {"conv1d", "conv2d", "conv3d"}
NORM = {"batch_norm"}
ADD = {"add", "add_", "__add__", "__iadd__", "__radd__"}
CAT = {"cat", "concat", "concatenate", "stack"}
DROPOUT = {"dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "feature_dropout"}
POOL = {f"{kind}_pool{d}d" for kind in ("max", "avg", "adaptive_avg", "adaptive_max") for d in (1, 2, 3)} | {
    "max_pool1d_with_indices",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
}
LAYOUT = {
    "view", "reshape", "flatten", "unflatten", "contiguous", "clone", "squeeze", "unsqueeze", "permute",
    "transpose", "t", "movedim", "__getitem__", "narrow", "view_as", "reshape_as", "expand", "expand_as",
}  # fmt: skip
REDUCE = {"mean", "sum", "amax"}


_KINDS: dict[str, str] = {}
for _kind, _names in (
    ("act", ACTIVATIONS), ("nonhom", NON_HOMOGENEOUS), ("linear", LINEAR), ("addmm", {"addmm"}), ("conv", CONV),
    ("norm", NORM), ("add", ADD), ("cat", CAT),
    ("dropout", DROPOUT), ("pool", POOL), ("layout", LAYOUT), ("reduce", REDUCE),
):  # fmt: skip
    for _name in _names:
        _KINDS.setdefault(_name, _kind)  # the first kind that lists a name wins


def op_kind(name: str) -> str:
    """Classify a torch function by its ``__name__``."""
    return _KINDS.get(name, "other")


_NESTED = (torch.Tensor, list, tuple)  # what _convert looks into (numbers, None, dtypes... pass as they are)


class Ref:
    """Stand-in for a recorded floating-point tensor argument: its value id and shape."""

    __slots__ = ("shape", "vid")

    def __init__(self, vid: int, shape: torch.Size) -> None:
        self.vid = vid
        self.shape = shape

    def __repr__(self) -> str:
        return f"Ref({self.vid}, {tuple(self.shape)})"


@dataclass
class Op:
    """One recorded torch call."""

    index: int
    name: str
    kind: str
    func: Callable[..., Any]
    module: str | None  # innermost module whose forward made the call
    args: tuple[Any, ...]  # tensors replaced by Ref (floating point) or kept (integer index tensors)
    kwargs: dict[str, Any]
    inputs: list[int]  # value ids of floating tensor arguments, in argument order
    outputs: list[int]

    def data_input(self) -> int | None:
        """Value id of the first positional argument, if it is a recorded tensor."""
        first = self.args[0] if self.args else None
        return first.vid if isinstance(first, Ref) else None


@dataclass
class Value:
    """One tensor value: its shape, the op that made it (None for inputs/parameters) and the ops that read it."""

    vid: int
    shape: torch.Size
    producer: int | None
    uses: list[int] = field(default_factory=list)
    floating: bool = True


class _EagerStance:
    """Compiled code runs eagerly while at least one trace is active (``torch.compiler.set_stance``).

    Counted, not nested: several callbacks may each run a trace over the same step and stop them in any order (their
    hooks run in callback order, not in reverse); the stance from before the first is restored when the last stops.
    The trace needs the real Python calls: inside compiled code Dynamo would trace the recording mode itself (slow, and
    it gives up after a few recompiles). A no-op when Dynamo was never imported (then nothing is compiled) or is too
    old to have stances (torch < 2.6).
    """

    def __init__(self) -> None:
        self.depth = 0
        self.saved: Any = None

    def enter(self) -> None:
        self.depth += 1
        if self.depth == 1:
            dynamo = sys.modules.get("torch._dynamo")
            set_stance = getattr(dynamo, "set_stance", None) if dynamo is not None else None
            self.saved = set_stance("force_eager") if set_stance is not None else None

    def exit(self) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0 and self.saved is not None:
            saved, self.saved = self.saved, None
            saved.__exit__(None, None, None)


EAGER = _EagerStance()


@contextmanager
def force_eager() -> Iterator[None]:
    """Run compiled code eagerly inside this block (counted together with active traces)."""
    EAGER.enter()
    try:
        yield
    finally:
        EAGER.exit()


class Trace(TorchFunctionMode):
    """Record ops while active. Use as a context manager, or ``start()``/``stop()`` across Lightning hooks.

    While active, modules compiled with ``torch.compile`` (an ``OptimizedModule``, or a compiled LightningModule passed
    to ``fit``) run eagerly, so that their ops are recorded; groups then name the layers under ``<name>._orig_mod``.
    """

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self.root = root
        self.ops: list[Op] = []
        self.values: list[Value] = []
        # id(tensor) -> (weak reference to it, value id); an entry whose reference is dead belongs to a freed tensor
        # whose id may have been reused (a WeakIdKeyDictionary does the same, at several times the cost per lookup)
        self._ids: dict[int, tuple[weakref.ref, int]] = {}
        self._stack: list[str] = []
        self.calls: dict[str, int] = {}
        self._handles: list[Any] = []
        self._eager = False
        self.active = False
        self.outputs: set[int] | None = None  # value ids of the traced call's results, when marked

    # -- module attribution -------------------------------------------------------------------------------
    def _hook_modules(self) -> None:
        for name, module in self.root.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name), always_call=True))

    def _pre(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self._stack.append(name)
            self.calls[name] = self.calls.get(name, 0) + 1

        return hook

    def _post(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._stack and self._stack[-1] == name:
                self._stack.pop()

        return hook

    def start(self) -> Trace:
        EAGER.enter()
        self._eager = True
        self._hook_modules()
        self.__enter__()
        self.active = True
        return self

    def stop(self) -> None:
        if self.active:
            self.active = False
            self.__exit__(None, None, None)
        if self._eager:
            self._eager = False
            EAGER.exit()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._ids = {}

    def mark_outputs(self, obj: Any) -> None:
        """Record the tensors in ``obj`` (a tensor, or lists, tuples and dicts of them) as the traced call's results.

        Call it before :meth:`stop`. Discovery then knows which reads reach the output; without it, every
        floating-point value that nothing reads counts as an output.
        """
        outs = self.outputs if self.outputs is not None else set()
        stack = [obj]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                vid = self._known(item)
                if vid is not None:
                    outs.add(vid)
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
        self.outputs = outs

    # -- recording ------------------------------------------------------------------------------------------
    def _known(self, t: torch.Tensor) -> int | None:
        entry = self._ids.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _vid(self, t: torch.Tensor) -> int:
        vid = self._known(t)
        if vid is None:
            vid = self._new_value(t, None)
        return vid

    def _new_value(self, t: torch.Tensor, producer: int | None) -> int:
        vid = len(self.values)
        self.values.append(Value(vid, t.shape, producer, floating=t.is_floating_point()))
        self._ids[id(t)] = (weakref.ref(t), vid)
        return vid

    def _convert(self, obj: Any, inputs: list[int]) -> Any:
        if isinstance(obj, torch.Tensor):
            if not obj.is_floating_point():
                return obj
            ref = Ref(self._vid(obj), obj.shape)
            inputs.append(ref.vid)
            return ref
        if isinstance(obj, (list, tuple)):
            return type(obj)([self._convert(o, inputs) if isinstance(o, _NESTED) else o for o in obj])
        return obj

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [out] if isinstance(out, torch.Tensor) else []
        if isinstance(out, (list, tuple)) and out and all(isinstance(o, torch.Tensor) for o in out):
            outs = list(out)
        if not outs:  # metadata queries (.shape, .dim(), ...) are not dataflow
            return out
        name = getattr(func, "__name__", str(func))
        inputs: list[int] = []
        rargs = self._convert(args, inputs)
        rkwargs = {k: self._convert(v, inputs) for k, v in kwargs.items()}
        index = len(self.ops)
        out_ids = [self._new_value(o, index) for o in outs]
        module = self._stack[-1] if self._stack else None
        self.ops.append(Op(index, name, op_kind(name), func, module, rargs, rkwargs, inputs, out_ids))
        for vid in dict.fromkeys(inputs):
            self.values[vid].uses.append(index)
        return out
