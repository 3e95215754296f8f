"""slice_optimizer_state_: a compacted model keeps training as if it had been built small."""

import copy
import math

import pytest
import torch
from compact_models import batches, kill, mlp, train
from torch import nn

import lightning_bv as lbv
from lightning_bv.transforms.compact import compact, slice_optimizer_state_


@pytest.mark.parametrize("make_opt", ["adam", "sgd", "adamw_amsgrad"])
def test_sliced_optimizer_matches_a_model_built_small(make_opt):
    def optimizer(params):
        if make_opt == "adam":
            return torch.optim.Adam(params, lr=1e-2)
        if make_opt == "sgd":
            return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
        return torch.optim.AdamW(params, lr=1e-2, amsgrad=True)

    big = mlp()
    opt = optimizer(big.parameters())
    train(big, opt, batches(3))
    groups = lbv.find_neurons(big, torch.randn(2, 5))
    kill(groups, {"0": [1, 4, 7], "2": [0, 3]})
    keep0 = [k for k in range(12) if k not in (1, 4, 7)]
    keep2 = [k for k in range(10) if k not in (0, 3)]

    # the reference: a model built at the small size, its weights and optimizer state sliced by hand
    small = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 3))
    index = {
        "0.weight": (keep0, None),
        "0.bias": (keep0,),
        "2.weight": (keep2, keep0),
        "2.bias": (keep2,),
        "4.weight": (None, keep2),
        "4.bias": (None,),
    }

    def cut(t, idx):
        for dim, i in enumerate(idx):
            if i is not None:
                t = t.index_select(dim, torch.tensor(i))
        return t.clone()

    small.load_state_dict({k: cut(v, index[k]) for k, v in big.state_dict().items()})
    small_opt = optimizer(small.parameters())
    state = copy.deepcopy(opt.state_dict())  # the 0-dim `step` tensors are shared otherwise
    names = [n for n, _ in big.named_parameters()]
    state["state"] = {
        i: {k: cut(v, index[names[i]]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in s.items()}
        for i, s in state["state"].items()
    }
    small_opt.load_state_dict(state)

    report = compact(big, groups)
    assert slice_optimizer_state_(opt, report.param_map) == 5
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in big.parameters()}
    data = batches(4, seed=1)
    train(big, opt, data)
    train(small, small_opt, data)
    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    assert all(math.isfinite(float(v["step"])) for v in opt.state.values() if "step" in v)
