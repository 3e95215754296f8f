"""Neuron groups on FSDP2 parameters in one process (a 1-rank gloo group): DTensors, the same numbers as plain tensors.

The 2-process fits are in tests/test_fsdp.py (slow); these check the kernels and the refusals quickly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from models import mlp
from torch import nn

import lightning_bv as lbv


@pytest.fixture(scope="module")
def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.fail("a process group is already initialized in this test process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def sharded(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def test_prox_on_sharded_weights_equals_plain_weights(mesh):
    x = torch.randn(4, 3)
    plain = mlp([3, 8, 6, 2])
    lbv.lift_shared_weights(plain, example_input=x, normalize=True)
    split = sharded(copy.deepcopy(plain), mesh)
    assert type(split[0].weight).__name__ == "DTensor"
    g_plain, g_split = lbv.find_neurons(plain, x), lbv.find_neurons(split, x)
    with torch.no_grad():
        for a, b in zip(lbv.neuron_scores(g_plain).values(), lbv.neuron_scores(g_split).values()):
            torch.testing.assert_close(b, a)
    lbv.proximal_step_(g_plain, 0.3, first=True)
    lbv.proximal_step_(g_split, 0.3, first=True)
    for (k, a), b in zip(plain.state_dict().items(), split.state_dict().values()):
        torch.testing.assert_close(b.full_tensor(), a, msg=k)
    with torch.no_grad():
        killed = sum(int((s == 0).sum()) for s in lbv.neuron_scores(g_split).values())
    assert 0 < killed < 14  # some of the 8 + 6 neurons died, not all


def test_norms_of_sharded_weights_with_grad_enabled_raise(mesh):
    x = torch.randn(4, 3)
    split = sharded(mlp([3, 8, 6, 2]), mesh)
    groups = lbv.find_neurons(split, x)
    with pytest.raises(NotImplementedError, match="norms of weights split across ranks .* not differentiable"):
        lbv.rbv_norm(groups)
    with torch.no_grad():
        assert float(lbv.rbv_norm(groups)) > 0


@pytest.mark.parametrize(
    ("call", "who"),
    [
        (lambda m, x: lbv.compact(m, example_input=x), "compact"),
        (lambda m, x: lbv.apply_low_rank(m, rank=1, targets=["2"]), "apply_low_rank"),
        (lambda m, x: lbv.lift_shared_weights(m, example_input=x), "lift_shared_weights"),
    ],
)
def test_surgery_on_a_sharded_model_is_refused_before_anything_changes(mesh, call, who):
    x = torch.randn(4, 3)
    split = sharded(mlp([3, 8, 6, 2]), mesh)
    before = {k: v.full_tensor().clone() for k, v in split.state_dict().items()}
    match = rf"`{who}` needs whole layers, but parameter '0.weight' of `model` is a DTensor"
    with pytest.raises(ValueError, match=match):
        call(split, x)
    after = split.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k].full_tensor(), v), k
