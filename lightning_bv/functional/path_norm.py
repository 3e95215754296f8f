"""Whole-network l_p path-norm (Neyshabur et al., 2015; Gonon et al., ICLR 2024), in one forward pass.

The path-norm is the sum, over every path from an input coordinate (or from a bias) to an output, of the product of
``|weight|^p`` along the path, to the power ``1/p``. It equals the output sum of the network whose weights and biases
are replaced by ``|.|^p`` (BatchNorm folded first, max-pools replaced by sums over their windows, average-pools by
sums times ``(1/window)^p``) evaluated on an all-ones input, where every ReLU is the identity.

The model's own ``forward`` runs under :func:`torch.func.functional_call` on float64 copies of its buffers. A
:class:`~torch.overrides.TorchFunctionMode` follows which tensors carry activations and rewrites the ops that touch
them; computations on parameters alone (parametrizations, low-rank products) run unchanged on float64 copies of the
parameters, so the norm is that of the effective weights. On CPU the weight of a Linear/Conv layer read directly is
not copied whole: its ``|W|^p`` is built in float64 one block of rows at a time, each block used while it is in cache
(a fresh float64 copy of a large weight costs more than the product itself, mostly in page faults). Any op on
activations outside an allow-list is refused, naming the op and the module. Forward hooks mark the module each op
runs in and switch BatchNorm modules to their eval branch for the length of their own call (restored on exit, also
on errors), so training mode needs no special care.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bv._trace import force_eager
from lightning_bv.functional._path_norm_mode import _PathNormMode
from lightning_bv.functional._path_norm_ops import _tensors

__all__ = ["path_norm"]


def path_norm(model: nn.Module, example_input: Tensor | tuple | Mapping[str, Any], p: float = 1) -> Tensor:
    r"""Whole-network :math:`\ell_p` path-norm of ``model``, differentiable with respect to its parameters.

    The sum over all input-output paths of :math:`\prod |w|^p` (a bias starts a path at its neuron), to the power
    :math:`1/p`, computed in one forward pass of the model's own ``forward`` on float64 copies of ``|theta|^p`` and
    an all-ones input: BatchNorm is folded into an affine map with its running statistics, max-pools become sums over
    their windows, average pools sums times ``(1/window)^p``, ReLU, LeakyReLU and Dropout the identity. Skip
    connections and concatenations need nothing. The model is not modified and may be in training mode.

    Args:
        model: a network built from Linear/Conv layers, BatchNorm, ReLU/LeakyReLU, Dropout, pooling, additions,
            concatenation and reshaping. Any other op on activations raises ``NotImplementedError`` naming the op
            and the module it ran in.
        example_input: an input batch, a tuple of positional inputs or a dict of keyword inputs (``model(**d)``) of
            the model; only the shapes of its floating-point tensors after the batch dimension are used. Integer
            tensors are token ids: the embedding that reads them is a Linear on the one-hot token, so every token of
            the vocabulary starts paths (the model's own ids only give the sequence length).
        p: the exponent, a finite number ``>= 1``.

    Returns:
        A float64 scalar tensor that carries gradients to the model's parameters (usable as a penalty).

    Note:
        BatchNorm is its own affine layer ``x -> scale * x + shift`` (``scale = gamma / sqrt(running_var + eps)``,
        ``shift = beta - running_mean * scale``): a bias of the layer before it and ``shift`` are two biases. This
        equals folding BatchNorm into a bias-free layer before it, as in ResNets. A constant ``c`` added to an
        activation counts like a bias ``|c|^p``; user forward hooks of the model run during the computation.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(1.0), net[0].bias.fill_(0.5), net[2].weight.fill_(-2.0), net[2].bias.fill_(1.0)
        >>> path_norm(net, torch.randn(8, 2), p=1).item()  # 3 neurons * 2 * (2 * 1 + 0.5) + 1
        16.0
        >>> round(path_norm(net, torch.randn(8, 2), p=2).item() ** 2, 6)  # 3 * 4 * (2 * 1 + 0.25) + 1
        28.0

    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 1:
        raise ValueError(f"`p` must be a finite number >= 1, got {p!r}")
    if isinstance(example_input, Mapping):
        keys, inputs = list(example_input), tuple(example_input.values())
    else:
        keys, inputs = None, example_input if isinstance(example_input, tuple) else (example_input,)

    def start(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if t.is_floating_point():
            return torch.ones((1, *t.shape[1:]), dtype=torch.float64, device=t.device)
        return t[:1].clone() if t.dim() > 0 and not t.dtype.is_complex and t.dtype != torch.bool else t

    ones = tuple(start(t) for t in inputs)
    starts = [t for t, x in zip(ones, inputs, strict=True) if t is not x and t.is_floating_point()]  # all-ones
    tokens = [t for t, x in zip(ones, inputs, strict=True) if t is not x and not t.is_floating_point()]
    if not starts and not tokens:
        raise ValueError(
            "`example_input` must be a floating-point tensor, or integer token ids, or a tuple or dict holding one"
        )
    state = {}  # parameters stay the model's own (the mode reads them in float64); buffers are float64 copies
    for k, v in model.named_buffers():  # copies: a forward in training mode may update buffers in place
        state[k] = v.detach().to(torch.float64 if v.is_floating_point() else v.dtype, copy=True)

    mode = _PathNormMode(p)
    mode.watch_params(list(model.parameters()))
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(mode.enter_hook(name)))
        handles.append(module.register_forward_hook(mode.exit_hook, always_call=True))
    device = (starts + tokens)[0].device.type  # mixed precision would round the float64 computation
    no_autocast = torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext()
    mode.mark(starts)
    mode.mark_tokens(tokens)
    args, kwargs = (ones, {}) if keys is None else ((), dict(zip(keys, ones)))
    try:
        with mode, no_autocast, force_eager():  # compiled code would trace the mode (slow; see _trace.force_eager)
            out = torch.func.functional_call(model, state, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    sums = [t.sum() for t in _tensors(out) if mode.is_act(t)]
    if not sums:
        raise ValueError("the model's output does not depend on its input, so it has no input-output paths")
    return torch.stack(sums).sum().pow(1 / p)
