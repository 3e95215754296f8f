"""The factored forms of a low-rank layer ``W = U V``: the forward as two thin products, or two layers.

:class:`_FactoredForward` is mixed into the class of a low-rank ``nn.Linear`` by
:func:`~lightning_bv.transforms.low_rank.apply_low_rank` (and taken out by ``remove_low_rank``); :func:`factorize`
replaces each low-rank layer by two small layers.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from lightning_bv._layers import has_low_rank_weight, low_rank_factors
from lightning_bv.transforms._low_rank_checks import _check_model


class _FactoredForward:
    """Mixed into a low-rank ``nn.Linear``: compute ``(x V^T) U^T`` instead of ``x (U V)^T`` when that is cheaper.

    The parametrization materializes ``W = U V`` at every forward (``out * r * in`` multiply-adds, and twice that in
    the backward pass) before the layer's own ``N * out * in``; the two thin products cost ``N * r * (in + out)``.
    For a lifted ``1024 x 1024`` layer at batch 256 that is 2.5x fewer. The result is the same function (rounding
    aside). Under a ``TorchFunctionMode`` (neuron discovery, ``path_norm``) the layer computes ``W`` as before, so
    they see one linear op with the effective weight.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        factors = low_rank_factors(self)  # type: ignore[arg-type]
        if factors is not None and not torch._C._is_torch_function_mode_enabled():
            U, V = factors  # noqa: N806
            out_f, r, in_f = U.shape[0], V.shape[0], V.shape[1]
            n = input.numel() // max(in_f, 1)
            if n * r * (in_f + out_f) < out_f * in_f * (r + n):
                return F.linear(F.linear(input, V), U, self.bias)  # type: ignore[attr-defined]
        return super().forward(input)  # type: ignore[misc]


_FACTORED: dict[type, type] = {}


def _factored_class(cls: type) -> type:
    """``cls`` (an ``nn.Linear`` class) with :class:`_FactoredForward` mixed in; other classes unchanged."""
    if not issubclass(cls, nn.Linear) or issubclass(cls, _FactoredForward):
        return cls
    if cls not in _FACTORED:
        _FACTORED[cls] = type(cls.__name__, (_FactoredForward, cls), {"_lbv_plain": cls, "__module__": __name__})
    return _FACTORED[cls]


def _plain_class(cls: type) -> type:
    """The class :func:`_factored_class` made ``cls`` from (``cls`` itself otherwise)."""
    return cast(type, getattr(cls, "_lbv_plain", cls))


def factorize(model: nn.Module) -> nn.Module:
    """Replace each low-rank layer by two small layers computing the same function (faster when ``r`` is small).

    A Linear ``in -> out`` of rank ``r`` becomes ``nn.Sequential(Linear(in, r, bias=False), Linear(r, out))``; a conv
    becomes ``nn.Sequential(ConvNd(in, r, <same kernel, stride, padding, dilation, padding_mode>, bias=False),
    ConvNd(r, out, 1))``. The bias moves to the second layer. Layers are replaced in their parent by attribute name,
    so state_dict keys change (``fc.weight`` -> ``fc.0.weight``, ``fc.1.weight``, ``fc.1.bias``); hooks on a replaced
    layer are not carried over.

    Returns:
        The model, changed in place; if ``model`` itself is low-rank, the new :class:`nn.Sequential` (use the return
        value).

    Example:
        >>> from lightning_bv import apply_low_rank
        >>> model = apply_low_rank(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), rank=2)
        >>> x = torch.randn(3, 8)
        >>> y = model(x)
        >>> model = factorize(model)
        >>> model[0]
        Sequential(
          (0): Linear(in_features=8, out_features=2, bias=False)
          (1): Linear(in_features=2, out_features=8, bias=True)
        )
        >>> torch.allclose(model(x), y, atol=1e-6)
        True

    """
    _check_model(model)
    replacements = [
        (name, _factorized(module)) for name, module in model.named_modules() if has_low_rank_weight(module)
    ]
    for name, new in replacements:
        if name == "":
            return new
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
    return model


def _factorized(module: Any) -> nn.Sequential:
    factors = low_rank_factors(module)
    assert factors is not None
    U, V = factors  # noqa: N806
    r = U.shape[1]
    bias = module.bias
    kw: dict[str, Any] = {"device": U.device, "dtype": U.dtype}
    if isinstance(module, nn.Linear):
        first: Any = nn.Linear(module.in_features, r, bias=False, **kw)
        second: Any = nn.Linear(r, module.out_features, bias=bias is not None, **kw)
    else:
        conv = parametrize.type_before_parametrizations(module)
        first = conv(
            module.in_channels,
            r,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=False,
            padding_mode=module.padding_mode,
            **kw,
        )
        second = conv(r, module.out_channels, 1, bias=bias is not None, **kw)
    with torch.no_grad():
        first.weight.copy_(V.reshape(first.weight.shape))
        second.weight.copy_(U.reshape(second.weight.shape))
        first.weight.requires_grad_(V.requires_grad)
        second.weight.requires_grad_(U.requires_grad)
        if bias is not None:
            second.bias.copy_(bias)
            second.bias.requires_grad_(bias.requires_grad)
    return nn.Sequential(first, second).train(module.training)
