"""Discovery (lightning_bv/neurons/discovery.py): find_neurons runs the model once; analyze reads the trace."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_bv import TargetsMatchNothingError, find_neurons


def summary(groups):
    return [(g.producers, g.norm, g.activation, g.consumers, g.num_neurons) for g in groups]


class ControlFlow(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace this, a real run can."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 7)
        self.b = nn.Linear(7, 4)
        self.c = nn.Linear(4, 5)
        self.d = nn.Linear(5, 1)

    def forward(self, x):
        h = self.b(F.relu(self.a(x)))
        for _ in range(int(x.abs().sum().item()) % 3 + 1):
            h = h * 0.5
        if x.mean() > 0:
            return self.d(F.relu(self.c(h)))
        return self.d(F.leaky_relu(self.c(h), 0.2))


def test_data_dependent_control_flow():
    x = torch.ones(3, 4)
    groups = find_neurons(ControlFlow(), x)
    assert summary(groups) == [(("a",), None, "relu", ("b",), 7), (("c",), None, "relu", ("d",), 5)]
    groups = find_neurons(ControlFlow(), -x)
    assert summary(groups)[1] == (("c",), None, "leaky_relu", ("d",), 5)


def test_targets_and_exclude():
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(4, 3)
    assert [g.name for g in find_neurons(net, x, targets=["2"])] == ["2"]
    assert [g.name for g in find_neurons(net, x, targets=r"\d", exclude=["0"])] == ["2"]
    with pytest.raises(TargetsMatchNothingError, match=r"'nope' matched no module.*Available: \['0', '2'\]"):
        find_neurons(net, x, targets=["nope"])


def test_rng_state_restored():
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    find_neurons(net, torch.ones(4, 3))  # dropout draws inside a forked RNG
    assert torch.equal(torch.rand(3), expected)


class Versioned(nn.Module):
    """torchvision MNASNet's check: loading a state_dict without its metadata raises."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))

    def forward(self, x):
        return self.net(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_buffers_are_restored_in_place_without_load_state_dict():
    model = Versioned().train()
    bn = model.net[1]
    mean, count = bn.running_mean, bn.num_batches_tracked
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = find_neurons(model, 3 + torch.randn(2, 1, 6, 6))
    assert [g.name for g in groups] == ["net.0"]
    assert bn.running_mean is mean  # the same tensors, values copied back
    assert bn.num_batches_tracked is count
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dict_and_token_inputs():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc1, self.fc2 = nn.Embedding(10, 4), nn.Linear(4, 6), nn.Linear(6, 1)

        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids)
            if attention_mask is not None:
                h = h * attention_mask.unsqueeze(-1)
            return self.fc2(F.relu(self.fc1(h))).sum(1)

    ids = torch.randint(0, 10, (2, 5))
    groups = find_neurons(Tokens(), {"input_ids": ids, "attention_mask": torch.ones(2, 5)})
    assert summary(groups) == [(("fc1",), None, "relu", ("fc2",), 6)]
    assert summary(find_neurons(Tokens(), ids)) == summary(groups)


def test_without_marked_outputs_every_unread_value_counts_as_one():
    from lightning_bv._trace import Trace
    from lightning_bv.neurons import analyze

    class Logged(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc1(x)
            self.stat = h.abs().mean()  # a statistic for logging
            return self.fc2(F.relu(h))

    model = Logged()
    for marked in (False, True):
        trace = Trace(model).start()
        try:
            out = model(torch.randn(4, 3))
            if marked:
                trace.mark_outputs(out)
        finally:
            trace.stop()
        assert len(analyze(trace, model)) == int(marked)
