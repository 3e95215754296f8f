"""Models and checks shared by the compaction tests (test_compact*.py, test_resize.py)."""

import copy
import socket

import models
import torch
import torch.nn.functional as F
from torch import nn

import lightning_bv as lbv
from lightning_bv.transforms.compact import compact


def kill(groups, which, regularized_only=True):
    """Zero the output weights v_k of the listed neurons: {group name: [k, ...]}."""
    for name, ks in which.items():
        g = groups[name]
        factor = torch.ones(g.num_neurons)
        factor[ks] = 0.0
        for s in g.v_slots:
            if s.regularized or not regularized_only:
                s.scale_(factor)


def assert_same_function(model, reference, inputs):
    """Equal up to rounding: compaction drops exact zeros, but the sums run in another order and length.

    The tolerance is relative to the output's scale: a few units in the last place of the largest output (16 eps
    of the dtype times max |y|), which is what float32 accumulation over a few layers leaves; an absolute 1e-6
    failed for outputs of size ~40 (a difference of 3.8e-6: one float32 ulp at 42.5).
    """
    model.eval()
    reference.eval()
    with torch.no_grad():
        for x in inputs:
            want = reference(x)
            diff = (model(x) - want).abs().max().item()
            tol = 16 * torch.finfo(want.dtype).eps * max(want.abs().max().item(), 1.0)
            assert diff <= tol, (diff, tol)


def compact_and_check(model, x, which, tol=0.0, regularized_only=True):
    """Kill neurons, compact with tol, check the function on fresh inputs; return the report and its new groups.

    The groups passed to compact are left as they were.
    """
    model.eval()
    groups = lbv.find_neurons(model, x)
    kill(groups, which, regularized_only)
    reference = copy.deepcopy(model)
    before = layout(groups)
    report = compact(model, groups, tol=tol)
    assert layout(groups) == before
    g = torch.Generator().manual_seed(1)
    fresh = [torch.randn(x.shape, generator=g, dtype=x.dtype), 3 * torch.randn(x.shape, generator=g, dtype=x.dtype)]
    assert_same_function(model, reference, [x, *fresh])
    return report, report.neuron_groups


def layout(groups):
    """Everything a group says about where its neurons are: counts, slot objects, indices, conv groups."""
    return [
        (
            g.name,
            g.num_neurons,
            [
                (id(s), s.module_name, s.param, s.dim, s.factor, getattr(s, "groups", None))
                + (None if s.index is None else (id(s.index), s.index.tolist()),)
                for s in g.slots()
            ],
        )
        for g in groups
    ]


def summary(groups):
    return {g.name: g.num_neurons for g in groups}


def assert_groups_equal(updated, found):
    """The groups compaction made (or updated) are the ones discovery finds on the compacted model."""
    assert [g.name for g in updated] == [g.name for g in found]
    for a, b in zip(updated, found):
        assert a.num_neurons == b.num_neurons, a.name
        for sa, sb in zip(a.slots(), b.slots()):
            assert (sa.module_name, sa.param, sa.dim) == (sb.module_name, sb.param, sb.dim)
            assert (sa.index is None) == (sb.index is None), (a.name, sa)
            if sa.index is not None:
                assert torch.equal(sa.index, sb.index), (a.name, sa)


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def warm_batchnorm(model, x):
    """A few train-mode passes so running statistics are not the defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.5 * torch.randn_like(x))
    model.eval()


def mlp():
    return models.mlp([5, 12, 10, 3])


cnn = models.cnn_bn_prelu


class BasicBlock(nn.Module):
    """torchvision-style ResNet block with a downsample branch: the second group sums two conv+BN producers."""

    def __init__(self, cin=3, cout=6):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = BasicBlock()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(x)), 1))


class ResidualMLP(nn.Module):
    def __init__(self, d=6, h=10):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, d)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.fc3, self.fc4 = nn.Linear(d, h), nn.Linear(h, d)
        self.out = nn.Linear(d, 1)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.fc2(F.relu(self.fc1(x)))
        x = x + self.fc4(torch.relu(self.fc3(x)))
        return self.out(x)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.left = nn.Linear(3, 4)
        self.right = nn.Linear(3, 5)
        self.head = nn.Linear(9, 2)
        self.aux = nn.Linear(5, 2)

    def forward(self, x):
        r = F.relu(self.right(x))
        return self.head(torch.cat([F.relu(self.left(x)), r], dim=1)) + self.aux(r)


class ScaledLinear(nn.Linear):
    """A Linear with one more per-output parameter (say, read by the loss) that compaction knows nothing about."""

    def __init__(self, *args):
        super().__init__(*args)
        self.scale = nn.Parameter(torch.ones(self.out_features))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 6)
        self.c.weight = self.a.weight  # tied
        self.d, self.e = nn.Linear(6, 5), nn.Linear(5, 1)

    def forward(self, x):
        h = F.relu(self.c(F.relu(self.b(F.relu(self.a(x))))))
        return self.e(F.relu(self.d(h)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.g = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(self.c(F.relu(self.g(x))))
        return self.fc(h.mean((2, 3)))


def scaled():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(), ScaledLinear(6, 5), nn.ReLU(), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 1)
    )


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.alias = self.net[2]  # the same module under a second name

    def forward(self, x):
        return self.net(x)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches(n, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, d, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


class GroupedConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 6, 3, padding=1, groups=2)  # reads 4 channels per group
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))


class DepthwiseBlock(nn.Module):
    """MobileNet-style: pw-BN-ReLU, dw-BN-ReLU (or no activation), pw."""

    def __init__(self, act=True):
        super().__init__()
        torch.manual_seed(0)
        self.pw1, self.bn1 = nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.dw, self.bn2 = nn.Conv2d(6, 12, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(12)  # 2 per channel
        self.pw2 = nn.Conv2d(12, 4, 1)
        self.act = act

    def forward(self, x):
        h = self.bn2(self.dw(F.relu(self.bn1(self.pw1(x)))))
        return self.pw2(F.relu(h) if self.act else h)


def trained_stats(model, x):
    model.train()
    with torch.no_grad():
        model(2 * torch.randn_like(x) + 1)
    return model
