"""The registry of per-layer-type shrinkers: which :class:`LayerShrinker` compaction and resizing use for a module.

:func:`~lightning_bv.transforms.compact.compact`, :func:`~lightning_bv.transforms.resize.resize_to_state_dict_`
and, through the kept indices they record, :func:`~lightning_bv.transforms.resize.slice_optimizer_state_` ask
:func:`shrinker_for` how to shrink each module. Built in: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (grouped and depthwise
too), any BatchNorm, ``nn.PReLU``, the low-rank factors of a Linear/Conv, and Hugging Face's ``Conv1D`` (recognized
by :func:`~lightning_bv.neurons.is_conv1d`). A module gets the shrinker registered for the first class of its MRO
that has one (a subclass of ``nn.Linear`` is shrunk as a Linear unless its own class is registered); a layer type
of your own is added with :func:`register_layer_shrinker`, as Torch-Pruning's ``register_customized_layer`` does.
"""

from __future__ import annotations

from torch import nn

from lightning_bv._layers import ANY_BATCH_NORM, CONVS
from lightning_bv.neurons import is_conv1d
from lightning_bv.transforms._layer_shrinkers import (
    CONV1D,
    BatchNormShrinker,
    ConvShrinker,
    LinearShrinker,
    PReLUShrinker,
)
from lightning_bv.transforms._shrinker import CannotShrink, LayerShrinker, ShrinkPlan

__all__ = ["CannotShrink", "LayerShrinker", "LinearShrinker", "ShrinkPlan", "register_layer_shrinker", "shrinker_for"]

_REGISTRY: dict[type, LayerShrinker] = {
    nn.Linear: LinearShrinker(),
    **dict.fromkeys(CONVS, ConvShrinker()),
    ANY_BATCH_NORM: BatchNormShrinker(),
    nn.PReLU: PReLUShrinker(),
}


def register_layer_shrinker(layer_type: type[nn.Module], shrinker: LayerShrinker) -> None:
    """Tell compaction and resizing how to shrink ``layer_type`` (and its subclasses without a shrinker of their own).

    Registering a type again replaces its shrinker. Subclass :class:`LayerShrinker` (or ``LinearShrinker`` for a
    layer shaped like ``nn.Linear``): say which tensors it has (``parameters``, ``buffers``), how wide it is
    (``size``) and which tensors the kept neurons give (``plan``); ``resize`` lets a compacted checkpoint load.
    Neuron discovery (:func:`~lightning_bv.find_neurons`) reads Linear and Conv layers: a subclass of one with extra
    tensors is found, and compacted once its shrinker is registered (else its groups are left whole).

    Args:
        layer_type: the module class.
        shrinker: an instance of a :class:`LayerShrinker` subclass.

    Raises:
        TypeError: ``layer_type`` is not an ``nn.Module`` subclass, or ``shrinker`` is not a :class:`LayerShrinker`.

    Example:
        A Linear with a per-output gain after it; the gain is shrunk with the output rows:

        >>> import torch
        >>> from torch import nn
        >>> import lightning_bv as lbv
        >>> class ScaledLinear(nn.Linear):
        ...     def __init__(self, n_in, n_out):
        ...         super().__init__(n_in, n_out)
        ...         self.gain = nn.Parameter(torch.ones(n_out))
        ...
        ...     def forward(self, x):
        ...         return super().forward(x) * self.gain
        >>> class ScaledLinearShrinker(LinearShrinker):
        ...     parameters = ("weight", "bias", "gain")
        ...
        ...     def plan(self, module, keep, plan):
        ...         super().plan(module, keep, plan)
        ...         plan.param(module, "gain", (keep.get("out"),))
        >>> register_layer_shrinker(ScaledLinear, ScaledLinearShrinker())
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), ScaledLinear(8, 2))
        >>> with torch.no_grad():
        ...     _ = net[2].weight[:, :5].zero_()  # neurons 0..4 of the first layer are dead
        >>> x = torch.randn(4, 3)
        >>> y = net(x)
        >>> report = lbv.compact(net, example_input=x)
        >>> net[2].in_features, torch.allclose(net(x), y)
        (3, True)
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"`layer_type` must be an nn.Module subclass, got {layer_type!r}")
    if not isinstance(shrinker, LayerShrinker):
        hint = " (pass an instance, not the class)" if isinstance(shrinker, type) else ""
        raise TypeError(f"`shrinker` must be an instance of a LayerShrinker subclass, got {shrinker!r}{hint}")
    _REGISTRY[layer_type] = shrinker


def shrinker_for(module: nn.Module) -> LayerShrinker | None:
    """The shrinker of ``module``: that of the first class of its MRO registered, else None (compaction refuses it).

    Example:
        >>> type(shrinker_for(nn.Linear(2, 3))).__name__, shrinker_for(nn.ReLU())
        ('LinearShrinker', None)
    """
    for cls in type(module).__mro__:
        shrinker = _REGISTRY.get(cls)
        if shrinker is not None:
            return shrinker.variant(module)
    return CONV1D if is_conv1d(module) else None
