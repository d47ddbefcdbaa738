"""Residual CNNs as people write them (not torchvision's classes), for fastres.optimize tests.

Each is written the way tutorials and papers' reference code write it: shortcuts as an empty
``nn.Sequential()`` or ``nn.Sequential(conv1x1, BN)``, ``out += identity``, ``F.relu`` in forward,
ReLU modules shared or made per block, the CIFAR "option A" shortcut as a LambdaLayer.
"""
import torch
import torch.nn.functional as F
from torch import nn


# -- tutorial ResNet (the common "BasicBlock with nn.Sequential shortcut" version) --------------
class TutorialBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, shared_relu=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))
        self.relu = shared_relu if shared_relu is not None else nn.ReLU(inplace=True)

    def forward(self, x):
        identity = self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return F.relu(out)


class TutorialResNet(nn.Module):
    """ImageNet-style stem (7x7/2 conv, max pool), blocks [2, 2, 2, 2] at ``width`` channels."""

    def __init__(self, layers=(2, 2, 2, 2), width=16, num_classes=10):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)          # one ReLU module, reused by every block
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(3, 2, 1)
        blocks, in_planes = [], width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            for j in range(n):
                blocks.append(TutorialBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, self.relu))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.blocks(x)
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


# -- CIFAR ResNet-20/32/44/56/110 (He et al. 2016, sec. 4.2) -----------------------------------
class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class CifarBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1, option="A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":   # parameter-free: subsample, zero-pad the new channels
                pad = planes // 4
                self.shortcut = LambdaLayer(
                    lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0))
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                              nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """depth = 6n + 2; 3x3 stem, no max pool, stages of 16/32/64 channels (``width`` x 1, 2, 4)."""

    def __init__(self, depth=20, option="A", width=16, num_classes=10):
        super().__init__()
        assert (depth - 2) % 6 == 0
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for i in range(3):
            planes = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(CifarBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, option))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        out = out.view(out.size(0), -1)
        return self.linear(out)


# -- pre-activation ResNet (He et al. 2016, "Identity mappings") and Wide ResNet --------------
class PreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1, dropout=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.conv2(out)
        out += shortcut
        return out


class PreActResNet(nn.Module):
    """PreActResNet-18 at ``layers=(2, 2, 2, 2)``: 3x3 stem, stages of width x 1, 2, 4, 8."""

    def __init__(self, layers=(2, 2, 2, 2), width=64, num_classes=10, stem_stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stem_stride, 1, bias=False)
        blocks, in_planes = [], width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            for j in range(n):
                blocks.append(PreActBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.layers(self.conv1(x))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis): pre-activation blocks, (depth-4)/6 per stage,
    16 -> 16k, 32k, 64k channels, dropout between the convs (identity in eval)."""

    def __init__(self, depth=28, widen=10, dropout=0.3, num_classes=10):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks, in_planes = [], widths[0]
        for i in range(3):
            for j in range(n):
                blocks.append(PreActBlock(in_planes, widths[i + 1], 2 if (i > 0 and j == 0) else 1, dropout))
                in_planes = widths[i + 1]
        self.block = nn.Sequential(*blocks)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.block(self.conv1(x))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(out.view(-1, self.fc.in_features))


# -- squeeze-and-excitation ResNet (Hu et al.) -------------------------------------------------
class SEModule(nn.Module):
    def __init__(self, channels, reduction=4, linear=False):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if linear:
            self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels, hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, channels), nn.Sigmoid(), nn.Unflatten(1, (channels, 1, 1)))
        else:
            self.fc = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                    nn.Conv2d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(self.pool(x))


class SEBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1, linear=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SEModule(planes, linear=linear)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + identity)


class SEResNet(nn.Module):
    def __init__(self, layers=(1, 1, 1), width=16, num_classes=10, linear=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, in_planes = [], width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            for j in range(n):
                blocks.append(SEBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, linear))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- ResNet-D (He et al. 2019, "Bag of tricks"): deep stem, avg-down shortcut ------------------
class ResNetDBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
            self.downsample = nn.Sequential(pool, nn.Conv2d(in_planes, planes, 1, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x += shortcut
        return self.act(x)


class ResNetD(nn.Module):
    def __init__(self, layers=(1, 1, 1, 1), width=16, num_classes=10):
        super().__init__()
        half = width // 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, width, 3, 1, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        blocks, in_planes = [], width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            for j in range(n):
                blocks.append(ResNetDBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.blocks(x)
        return self.fc(self.global_pool(x).flatten(1))


# -- something a residual CNN may contain that fastres does not fuse ---------------------------
class OddBlock(nn.Module):
    def __init__(self, planes):
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.GroupNorm(4, planes)

    def forward(self, x):
        out = F.silu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.gelu(out + x)


class OddResNet(nn.Module):
    """SiLU/GELU, GroupNorm, LeakyReLU, a 2x2 max pool and a global max pool + avg pool concat."""

    def __init__(self, width=16, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.LeakyReLU(0.1), nn.MaxPool2d(2))
        self.block = OddBlock(width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        pooled = torch.cat([F.adaptive_max_pool2d(x, 1), F.adaptive_avg_pool2d(x, 1)], 1)
        return self.fc(pooled.flatten(1))


def randomize_(model, seed=0):
    """Non-default BN statistics and affine parameters, and non-zero conv biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                c = m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.empty(c).uniform_(-0.3, 0.3, generator=g))
                    m.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=g))
                m.weight.copy_(torch.empty(c).uniform_(0.3, 1.0, generator=g))
                m.bias.copy_(torch.empty(c).uniform_(-0.2, 0.2, generator=g))
    return model.eval()


# -- constructors by name (``fastres verify --model tests/residual_zoo.py:cifar_resnet56``) -----
def cifar_resnet20():
    return CifarResNet(20, "A")


def cifar_resnet56():
    return CifarResNet(56, "A")


def preact_resnet18():
    return PreActResNet((2, 2, 2, 2), width=64)


def wide_resnet28_10():
    return WideResNet(28, 10)
