"""A zoo of real architectures, built here with the structure of torchvision / timm / Hugging Face models.

Nothing downloads: the CNNs are written out (torchvision does not load next to the CPU torch wheel here) with the
module layout of their originals; the transformers are ``transformers`` models built from tiny configs. Each
:class:`Case` lists the groups expected from reading the architecture: ``(name, norm, consumers, neurons)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    example: Callable[[], Any]  # a tensor or a dict of keyword arguments
    groups: list[tuple[str, str | None, tuple[str, ...], int]]
    skipped: int
    cannot_shrink: set[str] = field(default_factory=set)  # groups that compaction leaves whole, by design
    hf: bool = False


def call(model: nn.Module, example: Any) -> Tensor:
    """The model's main output tensor (the first field of a Hugging Face ModelOutput)."""
    out = model(**example) if isinstance(example, dict) else model(example)
    return out if isinstance(out, Tensor) else out[0]


# ------------------------------------------------------------------------------------------------------------
# torchvision ResNet: BasicBlock and Bottleneck with a downsample branch; one ReLU module called several times
# ------------------------------------------------------------------------------------------------------------
def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A torchvision ResNet with the given stage widths; ``widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)`` is
    resnet18's shape."""

    def __init__(self, widths: tuple[int, ...] = (8, 16), blocks: tuple[int, ...] = (1, 1), bottleneck_planes: int = 8):
        super().__init__()
        w0 = widths[0]
        self.conv1, self.bn1 = nn.Conv2d(3, w0, 7 if w0 >= 64 else 3, 2 if w0 >= 64 else 1, 3 if w0 >= 64 else 1,
                                         bias=False), nn.BatchNorm2d(w0)  # fmt: skip
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = w0, []
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.layer1 = stages[0]
        self.layer2 = stages[1]
        self.extra = nn.ModuleList(stages[2:])
        self.layer3 = nn.Sequential(Bottleneck(cin, bottleneck_planes, 2)) if bottleneck_planes else None
        cin = bottleneck_planes * 4 if bottleneck_planes else cin
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        for stage in self.extra:
            x = stage(x)
        if self.layer3 is not None:
            x = self.layer3(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_shaped() -> ResNet:
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), bottleneck_planes=0)


RESNET = Case(
    "resnet",
    ResNet,
    lambda: torch.randn(2, 3, 16, 16),
    [
        ("layer1.0.conv1", "layer1.0.bn1", ("layer1.0.conv2",), 8),
        ("layer2.0.conv1", "layer2.0.bn1", ("layer2.0.conv2",), 16),
        ("layer2.0.conv2+layer2.0.downsample.0", "layer2.0.bn2", ("layer3.0.conv1", "layer3.0.downsample.0"), 16),
        ("layer3.0.conv1", "layer3.0.bn1", ("layer3.0.conv2",), 8),
        ("layer3.0.conv2", "layer3.0.bn2", ("layer3.0.conv3",), 8),
        ("layer3.0.conv3+layer3.0.downsample.0", "layer3.0.bn3", ("fc",), 32),
    ],
    skipped=2,  # the stem's and layer1's outputs also feed layer1's identity add
)


# ------------------------------------------------------------------------------------------------------------
# torchvision VGG with BatchNorm
# ------------------------------------------------------------------------------------------------------------
class VGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(16 * 4, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(),
            nn.Linear(32, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


VGG_BN = Case(
    "vgg_bn",
    VGG,
    lambda: torch.randn(2, 3, 16, 16),
    [
        ("features.0", "features.1", ("features.4",), 8),
        ("features.4", "features.5", ("classifier.0",), 16),
        ("classifier.0", None, ("classifier.3",), 32),
        ("classifier.3", None, ("classifier.6",), 32),
    ],
    skipped=0,
)


# ------------------------------------------------------------------------------------------------------------
# torchvision SqueezeNet: Fire modules (squeeze, then two expand branches concatenated)
# ------------------------------------------------------------------------------------------------------------
class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze, self.squeeze_activation = nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True)
        self.expand1x1, self.expand1x1_activation = nn.Conv2d(squeeze, e1, 1), nn.ReLU(inplace=True)
        self.expand3x3, self.expand3x3_activation = nn.Conv2d(squeeze, e3, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1
        )


class SqueezeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(8, 4, 8, 8), Fire(16, 4, 8, 8),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(16, 10, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


SQUEEZENET = Case(
    "squeezenet",
    SqueezeNet,
    lambda: torch.randn(2, 3, 17, 17),
    [
        ("features.0", None, ("features.3.squeeze",), 8),
        ("features.3.squeeze", None, ("features.3.expand1x1", "features.3.expand3x3"), 4),
        ("features.3.expand1x1", None, ("features.4.squeeze",), 8),
        ("features.3.expand3x3", None, ("features.4.squeeze",), 8),
        ("features.4.squeeze", None, ("features.4.expand1x1", "features.4.expand3x3"), 4),
        ("features.4.expand1x1", None, ("classifier.1",), 8),
        ("features.4.expand3x3", None, ("classifier.1",), 8),
    ],
    skipped=1,  # the classifier's ReLU reaches the output through a pool
)


# ------------------------------------------------------------------------------------------------------------
# torchvision DenseNet: BatchNorm-ReLU over the concatenation of all earlier features, and a transition
# ------------------------------------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        concated = torch.cat(inputs, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, init: Tensor) -> Tensor:
        features = [init]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 8, 3, padding=1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(8))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        self.features.add_module("denseblock1", DenseBlock(2, 8, 4, 2))
        transition = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.Conv2d(16, 8, 1, bias=False),
                                   nn.AvgPool2d(2, 2))  # fmt: skip
        self.features.add_module("transition1", transition)
        self.features.add_module("norm5", nn.BatchNorm2d(8))
        self.classifier = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


_DB = "features.denseblock1"
DENSENET = Case(
    "densenet",
    DenseNet,
    lambda: torch.randn(2, 3, 16, 16),
    [
        (f"{_DB}.denselayer1.conv1", f"{_DB}.denselayer1.norm2", (f"{_DB}.denselayer1.conv2",), 8),
        (f"{_DB}.denselayer1.norm1", f"{_DB}.denselayer1.norm1", (f"{_DB}.denselayer1.conv1",), 8),
        (f"{_DB}.denselayer2.conv1", f"{_DB}.denselayer2.norm2", (f"{_DB}.denselayer2.conv2",), 8),
        (f"{_DB}.denselayer2.norm1", f"{_DB}.denselayer2.norm1", (f"{_DB}.denselayer2.conv1",), 12),
        ("features.transition1.2", "features.norm5", ("classifier",), 8),  # through the transition's pool
        ("features.transition1.0", "features.transition1.0", ("features.transition1.2",), 16),
    ],
    skipped=1,  # the stem's ReLU is read by the dense layers' BatchNorms
    cannot_shrink={f"{_DB}.denselayer1.norm1", f"{_DB}.denselayer2.norm1", "features.transition1.0"},
)


# ------------------------------------------------------------------------------------------------------------
# torchvision Inception: BasicConv2d branches (one through an average pool) concatenated
# ------------------------------------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionBlock(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 4, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 4, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(4, 6, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, 2, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        outs = [self.branch1x1(x), self.branch3x3_2(self.branch3x3_1(x)), self.branch_pool(pool)]
        return torch.cat(outs, 1)


class Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = BasicConv2d(3, 8, kernel_size=3, stride=2)
        self.mixed_a, self.mixed_b = InceptionBlock(8), InceptionBlock(12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mixed_b(self.mixed_a(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


def _mixed(b: str, nxt: tuple[str, ...]) -> list[tuple[str, str | None, tuple[str, ...], int]]:
    return [
        (f"{b}.branch1x1.conv", f"{b}.branch1x1.bn", nxt, 4),
        (f"{b}.branch3x3_1.conv", f"{b}.branch3x3_1.bn", (f"{b}.branch3x3_2.conv",), 4),
        (f"{b}.branch3x3_2.conv", f"{b}.branch3x3_2.bn", nxt, 6),
        (f"{b}.branch_pool.conv", f"{b}.branch_pool.bn", nxt, 2),
    ]


_B_IN = ("mixed_b.branch1x1.conv", "mixed_b.branch3x3_1.conv", "mixed_b.branch_pool.conv")
INCEPTION = Case(
    "inception",
    Inception,
    lambda: torch.randn(2, 3, 17, 17),
    [
        ("stem.conv", "stem.bn", ("mixed_a.branch1x1.conv", "mixed_a.branch3x3_1.conv", "mixed_a.branch_pool.conv"), 8),
        *_mixed("mixed_a", _B_IN),
        *_mixed("mixed_b", ("fc",)),
    ],
    skipped=0,
)


# ------------------------------------------------------------------------------------------------------------
# torchvision MNASNet (depthwise inverted residuals; its _load_from_state_dict needs the state_dict's metadata)
# ------------------------------------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.apply_residual = cin == cout and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel, padding=kernel // 2, stride=stride, groups=mid, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x) + x if self.apply_residual else self.layers(x)


class MNASNet(nn.Module):
    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4),
            InvertedResidual(4, 4, 3, 1, 3), InvertedResidual(4, 8, 5, 2, 3),
            nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.layers(x).mean([2, 3]))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):  # type: ignore[override]
        version = local_metadata.get("version", None)  # as torchvision's MNASNet does
        if version not in [1, 2]:
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


def _ir(b: str, mid: int, nxt: str) -> list[tuple[str, str | None, tuple[str, ...], int]]:
    return [(f"{b}.layers.0", f"{b}.layers.1", (f"{b}.layers.3",), mid),
            (f"{b}.layers.3", f"{b}.layers.4", (f"{b}.layers.6",), mid)]  # fmt: skip


MNASNET = Case(
    "mnasnet",
    MNASNet,
    lambda: torch.randn(2, 3, 16, 16),
    [
        ("layers.0", "layers.1", ("layers.3",), 8),
        ("layers.10", "layers.11", ("classifier.1",), 16),
        ("layers.3", "layers.4", ("layers.6",), 8),
        *_ir("layers.8", 12, ""),
        *_ir("layers.9", 12, ""),
    ],
    skipped=0,
)


# ------------------------------------------------------------------------------------------------------------
# timm / torchvision RegNetX: bottleneck blocks with a grouped 3x3 conv (group width 4)
# ------------------------------------------------------------------------------------------------------------
class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]  # fmt: skip
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ResBottleneckBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int) -> None:
        super().__init__()
        self.proj = ConvBN(cin, cout, 1, stride, act=False) if (cin != cout or stride != 1) else None
        self.f = nn.Sequential()
        self.f.add_module("a", ConvBN(cin, cout, 1))
        self.f.add_module("b", ConvBN(cout, cout, 3, stride, groups=cout // group_width))
        self.f.add_module("c", ConvBN(cout, cout, 1, act=False))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8, 3, 2)
        self.trunk = nn.Sequential(ResBottleneckBlock(8, 16, 2, 4), ResBottleneckBlock(16, 16, 1, 4))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.trunk(self.stem(x)), 1), 1))


REGNET = Case(
    "regnet",
    RegNet,
    lambda: torch.randn(2, 3, 16, 16),
    [
        ("stem.0", "stem.1", ("trunk.0.f.a.0", "trunk.0.proj.0"), 8),
        ("trunk.0.f.a.0", "trunk.0.f.a.1", ("trunk.0.f.b.0",), 16),
        ("trunk.0.f.b.0", "trunk.0.f.b.1", ("trunk.0.f.c.0",), 16),
        ("trunk.1.f.a.0", "trunk.1.f.a.1", ("trunk.1.f.b.0",), 16),
        ("trunk.1.f.b.0", "trunk.1.f.b.1", ("trunk.1.f.c.0",), 16),
    ],
    skipped=2,  # block 0's output feeds block 1's identity shortcut; block 1's sum includes it
)


# ------------------------------------------------------------------------------------------------------------
# Hugging Face transformers from tiny configs (never from_pretrained)
# ------------------------------------------------------------------------------------------------------------
def _ids() -> Tensor:
    return torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_opt() -> nn.Module:
    import transformers

    config = transformers.OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=32, word_embed_proj_dim=16,
    )  # fmt: skip
    return transformers.OPTForCausalLM(config)


def tiny_gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                     activation_function="relu", bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def tiny_bert() -> nn.Module:
    import transformers

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, hidden_act="relu", max_position_embeddings=32)  # fmt: skip
    return transformers.BertModel(config)


def tiny_t5() -> nn.Module:
    import transformers

    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                                   num_heads=2, feed_forward_proj="relu")  # fmt: skip
    return transformers.T5Model(config)


def _ffn(fmt: str, fc: str, out: str, layers: int, k: int) -> list[tuple[str, str | None, tuple[str, ...], int]]:
    return [(fmt.format(i) + fc, None, (fmt.format(i) + out,), k) for i in range(layers)]


OPT = Case("hf_opt", tiny_opt, lambda: {"input_ids": _ids()},
           _ffn("model.decoder.layers.{}.", "fc1", "fc2", 2, 32), skipped=0, hf=True)  # fmt: skip
GPT2 = Case("hf_gpt2_relu", tiny_gpt2, lambda: {"input_ids": _ids()},
            _ffn("transformer.h.{}.mlp.", "c_fc", "c_proj", 2, 64), skipped=0, hf=True)  # fmt: skip
BERT = Case("hf_bert_relu", tiny_bert, lambda: {"input_ids": _ids()},
            [(f"encoder.layer.{i}.intermediate.dense", None, (f"encoder.layer.{i}.output.dense",), 32) for i in (0, 1)],
            skipped=1, hf=True)  # fmt: skip  # the pooler's Tanh
T5 = Case("hf_t5", tiny_t5, lambda: {"input_ids": _ids(), "decoder_input_ids": _ids()},
          _ffn("encoder.block.{}.layer.1.DenseReluDense.", "wi", "wo", 2, 32)
          + _ffn("decoder.block.{}.layer.2.DenseReluDense.", "wi", "wo", 2, 32), skipped=0, hf=True)  # fmt: skip

CNNS = [RESNET, VGG_BN, SQUEEZENET, DENSENET, INCEPTION, MNASNET, REGNET]
TRANSFORMERS = [OPT, GPT2, BERT, T5]
ZOO = CNNS + TRANSFORMERS
