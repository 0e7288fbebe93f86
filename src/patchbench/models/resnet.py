"""ResNets: He et al., "Deep Residual Learning for Image Recognition" (arXiv:1512.03385).

- `ResNet` / `resnet18`: the paper's ResNet-18 with BasicBlocks, the same structure, parameter count
  (11,181,642 at 10 classes) and init as torchvision's `resnet18`, so torchvision weights load by
  position. `small_input=True` swaps the 7x7/2 stem and its max-pool for one 3x3/1 conv (the paper's
  CIFAR practice), for 32px images.
- `ResNet9` / `resnet9`: the 9-layer residual net of Myrtle.ai's DAWNBench CIFAR-10 entry (David Page,
  "How to train your ResNet", 2018), widths 64-128-256-512, without its 0.125 output scale. Global max
  pooling makes it run at any input size of at least 8 pixels.
- `notebook_resnet9`: the study notebook's ResNet-9 (width 32, conv biases, dropout 0.2), see its docstring.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from patchbench.models import register_model
from patchbench.models.layers import Residual, Width, check_img_size, kaiming_init_


class BasicBlock(nn.Module):
    """Two 3x3 convs with a skip; a strided 1x1 conv + BN on the skip when the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.relu(x + skip)


class ResNet(nn.Module):
    """ResNet with BasicBlocks: stem -> 4 stages (width x (1, 2, 4, 8) channels) -> avg pool -> linear.

    The default width 64 is the paper's (64, 128, 256, 512); other widths serve matched parameter budgets.
    """

    def __init__(
        self,
        *,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        small_input: bool = False,
        width: int = 64,  # channels of the first stage; stages have width x (1, 2, 4, 8) (matched budgets)
        in_chans: int = 3,
        num_classes: int = 10,
        img_size: int | None = None,
    ):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1 or width < 1 or in_chans < 1 or num_classes < 1:
            raise ValueError(f"ResNet needs 4 positive stage depths and positive width/in_chans/num_classes, "
                             f"got layers={layers}, width={width}, in_chans={in_chans}, num_classes={num_classes}")
        self.default_img_size = check_img_size(
            (32 if small_input else 224) if img_size is None else img_size, 1, "ResNet")
        if small_input:  # 32px images: keep the full resolution into the first stage
            stem = [("conv", nn.Conv2d(in_chans, width, 3, padding=1, bias=False))]
        else:
            stem = [("conv", nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False))]
        stem += [("bn", nn.BatchNorm2d(width)), ("relu", nn.ReLU(inplace=True))]
        if not small_input:
            stem.append(("pool", nn.MaxPool2d(3, stride=2, padding=1)))
        self.stem = nn.Sequential(OrderedDict(stem))
        stages, in_chs = [], width
        for i, (depth, out_chs) in enumerate(zip(layers, (width, 2 * width, 4 * width, 8 * width))):
            blocks = [BasicBlock(in_chs if j == 0 else out_chs, out_chs, stride=2 if i > 0 and j == 0 else 1)
                      for j in range(depth)]
            stages.append((f"layer{i + 1}", nn.Sequential(*blocks)))
            in_chs = out_chs
        self.blocks = nn.Sequential(OrderedDict(stages))
        self.head = nn.Sequential(OrderedDict(
            pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1), fc=nn.Linear(8 * width, num_classes)))
        for m in self.modules():  # torchvision's init; Linear keeps PyTorch's default
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def width(self) -> Width:  # the first stage's channels; the others are multiples of it
        return Width("width", self.stem.conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, 64, H/4, W/4), or (B, 64, H, W) with small_input
        x = self.blocks(x)  # (B, 512, H/32, W/32), or H/8 with small_input
        return self.head(x)  # (B, num_classes)


@register_model(layers=(2, 2, 2, 2))
def resnet18(**kw) -> ResNet:
    """ResNet-18, torchvision-equivalent; natural size 160px (the study's images), 32px with small_input."""
    if kw.get("img_size") is None:
        kw["img_size"] = 32 if kw.get("small_input") else 160
    return ResNet(**kw)


def conv_bn_relu(in_chs: int, out_chs: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=bias),
        bn=nn.BatchNorm2d(out_chs),
        relu=nn.ReLU(inplace=True),
    ))


class ResNet9(nn.Module):
    """ResNet-9: prep conv, 3 stages of [conv -> max-pool 2] (residual pair after stages 1 and 3), head.

    Channels are width x (1, 2, 4, 8). The head is a global max pool, so the net runs at any size of at
    least 8 pixels (three halvings); at 32px it equals the notebooks' fixed MaxPool2d(4).
    """

    def __init__(self, *, width: int = 64, conv_bias: bool = False, drop_rate: float = 0.0,
                 in_chans: int = 3, num_classes: int = 10, img_size: int = 32):
        super().__init__()
        if width < 1 or in_chans < 1 or num_classes < 1:
            raise ValueError(f"ResNet9 needs positive width, in_chans and num_classes, "
                             f"got width={width}, in_chans={in_chans}, num_classes={num_classes}")
        self.default_img_size = check_img_size(img_size, 8, "ResNet9")
        c = [width, 2 * width, 4 * width, 8 * width]
        self.stem = conv_bn_relu(in_chans, c[0], conv_bias)
        self.blocks = nn.Sequential(OrderedDict(
            layer1=nn.Sequential(conv_bn_relu(c[0], c[1], conv_bias), nn.MaxPool2d(2)),
            res1=Residual(nn.Sequential(conv_bn_relu(c[1], c[1], conv_bias), conv_bn_relu(c[1], c[1], conv_bias))),
            layer2=nn.Sequential(conv_bn_relu(c[1], c[2], conv_bias), nn.MaxPool2d(2)),
            layer3=nn.Sequential(conv_bn_relu(c[2], c[3], conv_bias), nn.MaxPool2d(2)),
            res3=Residual(nn.Sequential(conv_bn_relu(c[3], c[3], conv_bias), conv_bn_relu(c[3], c[3], conv_bias))),
        ))
        self.head = nn.Sequential(OrderedDict(
            pool=nn.AdaptiveMaxPool2d(1), flatten=nn.Flatten(1), drop=nn.Dropout(drop_rate),
            fc=nn.Linear(c[3], num_classes)))

    def width(self) -> Width:  # the first stage's channels; the others are multiples of it
        return Width("width", self.stem.conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, w, H, W)
        x = self.blocks(x)  # (B, 8w, H/8, W/8)
        return self.head(x)  # (B, num_classes)


@register_model
def resnet9(**kw) -> ResNet9:
    """Myrtle's ResNet-9 (6.57M parameters), natural size 32px; any size >= 8 works."""
    return ResNet9(**kw)


@register_model(width=32, conv_bias=True, drop_rate=0.2, img_size=32)
def notebook_resnet9(**kw) -> ResNet9:
    """The study notebook's ResNet-9, exactly (1,647,242 parameters at 10 classes), for 32px images.

    Width 32 (channels 32-64-128-256), conv biases before every BN, dropout 0.2 before the classifier,
    and the notebook's kaiming-normal init of every conv/linear weight with zero biases.
    Deviation (documented): the notebook ends with a fixed MaxPool2d(4), which only fits 32px inputs
    (4x4 maps); we use a global max pool, identical at 32px and parameter-free, so the same model also
    runs at 160px (20x20 maps) with the same 1,647,242 parameters.
    """
    return kaiming_init_(ResNet9(**kw))
