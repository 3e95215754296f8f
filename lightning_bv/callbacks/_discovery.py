"""Find a LightningModule's neuron groups once, from its first real training step (private, shared by callbacks)."""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor, nn

from lightning_bv._select import Targets
from lightning_bv._trace import Trace
from lightning_bv.neurons import NeuronGroups, analyze


class GroupDiscovery:
    """Record the first training step's forward and turn it into neuron groups; keep a size-1 example input.

    Call :meth:`start` in ``on_train_batch_start`` and :meth:`finish` once the forward has run (``on_before_backward``,
    and again in ``on_before_optimizer_step`` in case a custom backward skipped that hook); :meth:`abort` in
    ``on_exception``. Nothing of the model changes: the trace only watches. A forward pre-hook on the module keeps the
    positional inputs of its first real ``forward`` call of that step, sliced to one sample, in :attr:`example_input`
    when the step calls the module itself. A ``training_step`` that calls ``self.net(x)`` instead gets the input of
    that call, with :attr:`example_root` the child's name (``"net"``; ``""`` for the module itself), when exactly one
    child holding all the module's parameters is called in the step (else :attr:`example_input` stays None). Calls
    that Lightning reroutes through ``forward`` (under DDP the module is called with the ``training_step`` arguments
    while its ``forward`` is patched) are not kept.

    Picklable (``ddp_spawn`` pickles callbacks); a running trace is left out.
    """

    def __init__(self, targets: Targets = None, exclude: Targets = None) -> None:
        self.targets = targets
        self.exclude = exclude
        self.example_input: tuple[Any, ...] | None = None
        self.example_root: str = ""
        self._trace: Trace | None = None
        self._hook: Any = None
        self._child_hooks: list[Any] = []
        self._args: tuple[Any, ...] | None = None
        self._child_args: dict[str, tuple[Any, ...]] = {}

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`finish`."""
        return self._trace is not None

    def start(self, module: nn.Module) -> None:
        """Start recording the dataflow of ``module`` (no-op when already recording)."""
        if self._trace is not None:
            return
        self._args = None
        self._child_args = {}
        self._hook = module.register_forward_pre_hook(self._capture)
        self._child_hooks = [
            child.register_forward_pre_hook(functools.partial(self._capture_child, name))
            for name, child in module.named_children()
            if next(child.parameters(), None) is not None
        ]
        self._trace = Trace(module).start()

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._args is None and is_own_forward(module):
            self._args = args  # references only: slicing here would be recorded by the trace

    def _capture_child(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._child_args.setdefault(name, args)

    def finish(self, module: nn.Module, outputs: Any = None) -> NeuronGroups | None:
        """Stop recording; the groups found, or None when nothing was being recorded.

        ``outputs`` (the step's loss, in ``on_before_backward``) are the results that matter: reads that do not
        reach them (a statistic logged in ``forward``) then do not make a group unsafe. Without them every
        floating-point value that nothing reads counts as a result.
        """
        if self._trace is None:
            return None
        trace = self._trace
        if outputs is not None:
            trace.mark_outputs(outputs)
        self.abort()
        if self.example_input is None and self._args is not None:
            self.example_input = tuple(_first_sample(a) for a in self._args)
        elif self.example_input is None and len(self._child_args) == 1:
            name, args = next(iter(self._child_args.items()))
            child = module.get_submodule(name)
            if {id(p) for p in child.parameters()} == {id(p) for p in module.parameters()}:
                self.example_input, self.example_root = tuple(_first_sample(a) for a in args), name
        self._args = None
        self._child_args = {}
        return analyze(trace, module, self.targets, self.exclude)

    def abort(self) -> None:
        """Stop recording and drop the trace (safe to call at any time)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for hook in self._child_hooks:
            hook.remove()
        self._child_hooks = []
        if self._trace is not None:
            trace, self._trace = self._trace, None
            trace.stop()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # a live trace holds hooks and tensors: not pickled
        state.update(_trace=None, _hook=None, _args=None, _child_hooks=[], _child_args={})
        return state


def is_own_forward(module: nn.Module) -> bool:
    """False while Lightning's forward redirection has patched ``module.forward`` (to run ``training_step`` in DDP)."""
    return getattr(module.forward, "__func__", None) is getattr(type(module), "forward", None)


def _first_sample(obj: Any) -> Any:
    """A detached copy of the first sample of a batched tensor; anything else unchanged."""
    if isinstance(obj, Tensor) and obj.dim() > 0:
        return obj[:1].detach().clone()
    return obj
