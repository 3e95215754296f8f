"""The analysis of a trace (lightning_bv/neurons/analysis.py): producers, consumers, liveness, skip reasons."""

import torch
import torch.nn.functional as F
from torch import nn

from lightning_bv import find_neurons


def summary(groups):
    return [(g.producers, g.norm, g.activation, g.consumers, g.num_neurons) for g in groups]


def test_mlp_groups_and_output_activation_skipped():
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 6), nn.LeakyReLU(0.1), nn.Linear(6, 2), nn.ReLU())
    groups = find_neurons(net, torch.randn(4, 3))
    assert summary(groups) == [(("0",), None, "relu", ("2",), 8), (("2",), None, "leaky_relu", ("4",), 6)]
    assert groups[0].producer == "0"
    assert len(groups.skipped) == 1
    assert "model output" in groups.skipped[0][1]
    assert groups["2"].num_neurons == 6
    report = str(groups)
    assert "2 neuron group(s), 14 neurons" in report
    assert "skipped 1" in report


def test_cnn_batchnorm_flatten():
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(36, 5),
        nn.PReLU(),
        nn.Linear(5, 2),
    )
    x = torch.randn(2, 1, 8, 8)
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    groups = find_neurons(cnn, x)
    assert summary(groups) == [(("0",), "1", "relu", ("6",), 4), (("6",), None, "prelu", ("8",), 5)]
    # neuron k (channel k, 3x3 after pooling) owns columns 9k..9k+8 of the Linear after the flatten
    idx = groups[0].v_slots[0].index
    assert torch.equal(idx, torch.arange(36).reshape(4, 9))
    # the input scale of a neuron behind BatchNorm is gamma
    assert groups[0].w_slots[0].module is cnn[1]
    # running statistics and num_batches_tracked are restored
    for k, v in cnn.state_dict().items():
        assert torch.equal(v, before[k]), k


class ResidualMLP(nn.Module):
    def __init__(self, d=6, h=10):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.fc3 = nn.Linear(d, h)
        self.fc4 = nn.Linear(h, d)
        self.out = nn.Linear(d, 1)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.fc2(F.relu(self.fc1(x)))
        x = x + self.fc4(torch.relu(self.fc3(x)))
        return self.out(F.relu(x))  # relu(x) where x is a sum with an identity skip: skipped


def test_residual_mlp():
    groups = find_neurons(ResidualMLP(), torch.randn(5, 3))
    assert summary(groups) == [(("fc1",), None, "relu", ("fc2",), 10), (("fc3",), None, "relu", ("fc4",), 10)]
    assert len(groups.skipped) == 1
    assert "read elsewhere, e.g. by a residual stream" in groups.skipped[0][1]


class BasicBlock(nn.Module):
    """torchvision-style ResNet block with a downsample branch (conv+BN) and one shared ReLU module."""

    def __init__(self, cin=3, cout=6, downsample=True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2 if downsample else 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout)) if downsample else None
        )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


def test_resnet_sum_of_producers_is_one_group():
    groups = find_neurons(TinyResNet([BasicBlock(3, 6, downsample=True)]), torch.randn(2, 3, 8, 8))
    assert summary(groups) == [
        (("blocks.0.conv1",), "blocks.0.bn1", "relu", ("blocks.0.conv2",), 6),
        (("blocks.0.conv2", "blocks.0.downsample.0"), "blocks.0.bn2", "relu", ("fc",), 6),
    ]
    g = groups[1]
    assert g.name == "blocks.0.conv2+blocks.0.downsample.0"
    assert g.norms == ("blocks.0.bn2", "blocks.0.downsample.1")
    # w_k concatenates the gammas of both branches; both betas are biases
    assert [s.module_name for s in g.w_slots] == ["blocks.0.bn2", "blocks.0.downsample.1"]
    assert [s.param for s in g.b_slots] == ["bias", "bias"]
    assert groups.skipped == []


def test_resnet_identity_skips_are_skipped():
    net = TinyResNet([BasicBlock(3, 6, downsample=True), BasicBlock(6, 6, downsample=False)])
    groups = find_neurons(net, torch.randn(2, 3, 8, 8))
    assert [g.name for g in groups] == ["blocks.0.conv1", "blocks.1.conv1"]
    reasons = [why for _, why in groups.skipped]
    assert len(reasons) == 2
    # block 0's output also feeds block 1's identity add; block 1's pre-activation includes the identity
    assert "activation output also flows through a parameter-free path" in reasons[0]
    assert "pre-activation also flows through a parameter-free path" in reasons[1]


def test_transformer_encoder_feed_forward():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    groups = find_neurons(enc, torch.randn(5, 2, 8))
    assert summary(groups) == [
        (("layers.0.linear1",), None, "relu", ("layers.0.linear2",), 16),
        (("layers.1.linear1",), None, "relu", ("layers.1.linear2",), 16),
    ]


def test_decoder_layer_feed_forward():
    dec = nn.TransformerDecoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
    groups = find_neurons(dec, (torch.randn(2, 4, 8), torch.randn(2, 3, 8)))
    assert summary(groups) == [(("linear1",), None, "relu", ("linear2",), 12)]


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Linear(3, 4)
        self.right = nn.Linear(3, 5)
        self.head = nn.Linear(9, 2)
        self.aux = nn.Linear(5, 1)

    def forward(self, x):
        r = F.relu(self.right(x))
        return self.head(torch.cat([F.relu(self.left(x)), r], dim=1)) + self.aux(r)


def test_concat_of_two_branches_and_two_consumers():
    groups = find_neurons(Concat(), torch.randn(2, 3))
    # groups come in execution order (topological)
    assert summary(groups) == [(("right",), None, "relu", ("aux", "head"), 5), (("left",), None, "relu", ("head",), 4)]
    right, left = groups
    assert torch.equal(left.v_slots[0].index.flatten(), torch.arange(4))
    head_slot = next(s for s in right.v_slots if s.module_name == "head")
    assert torch.equal(head_slot.index.flatten(), torch.arange(4, 9))
    aux_slot = next(s for s in right.v_slots if s.module_name == "aux")
    assert aux_slot.index is None  # column k alone


def test_shared_module_called_twice_is_skipped():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(4, 4)
            self.g = nn.Linear(4, 4)

        def forward(self, x):
            return self.g(F.relu(self.f(F.relu(self.f(x)))))

    groups = find_neurons(Shared(), torch.randn(2, 4))
    assert len(groups) == 0
    assert all("called 2 times" in why for _, why in groups.skipped)


def test_foreign_parametrization_is_skipped_not_silently_ignored():
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    torch.nn.utils.parametrizations.weight_norm(net[0])
    groups = find_neurons(net, torch.randn(2, 3))
    assert len(groups) == 0
    assert "parametrization lightning_bv cannot rescale" in groups.skipped[0][1]


class Gated(nn.Module):
    """``if h.mean() > t: h = relu(h)``, and a statistic of the pre-activation kept for logging."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 2)
        self.stats = []

    def forward(self, x):
        h = self.fc1(x)
        self.stats.append(h.detach().abs().mean())  # logged, never part of the output
        h = F.relu(h) if h.mean() > -100.0 else h  # a branch chosen on a statistic
        return self.fc2(h)


def test_reads_that_never_reach_the_output_do_not_make_a_group_unsafe():
    groups = find_neurons(Gated(), torch.randn(4, 3))
    assert summary(groups) == [(("fc1",), None, "relu", ("fc2",), 8)]
    assert groups.skipped == []


class ReadAfterActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 2)
        self.last = None

    def forward(self, x):
        a = torch.relu(self.fc1(x))
        self.last = a.sum(0)  # kept on the module, not returned
        return self.fc2(a)


def test_a_statistic_of_the_activation_is_not_a_use():
    groups = find_neurons(ReadAfterActivation(), torch.randn(4, 3))
    assert summary(groups) == [(("fc1",), None, "relu", ("fc2",), 8)]


def test_a_read_that_reaches_the_output_still_makes_a_group_unsafe():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(F.relu(h)), h.mean()  # the statistic is an output

    groups = find_neurons(Leaky(), torch.randn(4, 3))
    assert len(groups) == 0
    assert "also read elsewhere" in groups.skipped[0][1]


def test_non_homogeneous_activations_are_listed_with_the_reason():
    # mobilenet_v2 style: every activation a ReLU6
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(inplace=True), nn.Conv2d(8, 8, 1), nn.ReLU6(),
        nn.Flatten(), nn.Linear(8 * 36, 8), nn.GELU(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8), nn.Hardswish(),
        nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 1),
    )  # fmt: skip
    groups = find_neurons(net, torch.randn(2, 3, 8, 8))
    assert len(groups) == 0
    kinds = ["ReLU6", "ReLU6", "GELU", "SiLU", "Hardswish", "Tanh", "Sigmoid"]
    assert [why.split(" ")[0] for _, why in groups.skipped] == kinds
    assert all("is not positively homogeneous" in why for _, why in groups.skipped)
    assert groups.skipped[0][0].startswith("hardtanh (op ")  # the op ReLU6 calls, in its module
    assert groups.non_homogeneous() == {"ReLU6": 2, "GELU": 1, "SiLU": 1, "Hardswish": 1, "Tanh": 1, "Sigmoid": 1}
    assert groups.found_instead().startswith("found 2 ReLU6, 1 GELU, 1 SiLU, 1 Hardswish, 1 Tanh, 1 Sigmoid activation")
    assert (
        find_neurons(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), torch.randn(1, 2)).found_instead()
        == ""
    )


class ConcatNorm(nn.Module):
    """DenseNet's dense layer: BatchNorm-ReLU over the concatenation of earlier features."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)
        self.norm = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 5, 1)
        self.head = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        a = self.a(x)
        return self.conv(F.relu(self.norm(torch.cat([a, self.b(x)], 1)))) + self.head(a)


def test_batchnorm_over_a_concat_is_its_own_producer():
    model = ConcatNorm()
    groups = find_neurons(model, torch.randn(2, 3, 4, 4))
    assert summary(groups) == [(("norm",), "norm", "relu", ("conv",), 6)]
    g = groups[0]
    # input scale |gamma_k|, bias beta_k
    assert [(s.module_name, s.param) for s in g.w_slots + g.b_slots] == [("norm", "weight"), ("norm", "bias")]
    assert g.w_slots[0].regularized
