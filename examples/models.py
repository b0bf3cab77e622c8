"""Robot-style networks in plain PyTorch, random weights (no downloads).

* ``resnet18`` / ``resnet50``, ``vgg11``, ``mobilenet_v2``: image classifiers at 224x224.
* ``KeypointNet``: a one-stage human-pose detector in the spirit of KAPAO: a CSP-style
  backbone, a feature-pyramid neck, and heads that predict per anchor an objectness,
  a box and K keypoints at three strides.
* ``SceneCompletionNet``: a 3-D semantic scene completion net in the spirit of AGRNav's
  SCONet: a voxel encoder-decoder of 3-D convolutions with skip connections that turns
  a sparse occupancy grid into per-voxel class logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: type = nn.ReLU,
            pad: int | None = None) -> nn.Sequential:
    pad = k // 2 if pad is None else pad
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, pad, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act(inplace=True) if act is not nn.Identity else nn.Identity())


# -- classifiers ----------------------------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, width, 3, stride), conv_bn(width, width, 3, 1, act=nn.Identity))
        self.skip = (nn.Identity() if stride == 1 and cin == width
                     else conv_bn(cin, width, 1, stride, act=nn.Identity))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(conv_bn(cin, width, 1), conv_bn(width, width, 3, stride),
                                  conv_bn(width, cout, 1, act=nn.Identity))
        self.skip = nn.Identity() if stride == 1 and cin == cout else conv_bn(cin, cout, 1, stride, act=nn.Identity)

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class ResNet(nn.Module):
    def __init__(self, block, depths: list[int], num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for i, n in enumerate(depths):
            width = 64 * 2**i
            for j in range(n):
                layers.append(block(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def vgg11(num_classes: int = 1000) -> nn.Module:
    layers, cin = [], 3
    for v in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(512 * 49, 4096), nn.ReLU(True),
                         nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, num_classes))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   conv_bn(hidden, cout, 1, act=nn.Identity)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def mobilenet_v2(num_classes: int = 1000) -> nn.Module:
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers, cin = [conv_bn(3, 32, 3, 2, act=nn.ReLU6)], 32
    for t, c, n, s in cfg:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += [conv_bn(cin, 1280, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
               nn.Linear(1280, num_classes)]
    return nn.Sequential(*layers)


CLASSIFIERS = {"resnet18": resnet18, "resnet50": resnet50, "vgg11": vgg11, "mobilenet_v2": mobilenet_v2}


# -- keypoint detector (KAPAO-like) -------------------------------------------------------

class CSPBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int):
        super().__init__()
        mid = cout // 2
        self.a, self.b = conv_bn(cin, mid, 1, act=nn.SiLU), conv_bn(cin, mid, 1, act=nn.SiLU)
        self.m = nn.Sequential(*[nn.Sequential(conv_bn(mid, mid, 1, act=nn.SiLU), conv_bn(mid, mid, 3, act=nn.SiLU))
                                 for _ in range(n)])
        self.out = conv_bn(2 * mid, cout, 1, act=nn.SiLU)

    def forward(self, x):
        return self.out(torch.cat([self.m(self.a(x)), self.b(x)], 1))


class KeypointNet(nn.Module):
    """Per anchor and stride: objectness, box (4), and K keypoints (x, y, visibility)."""

    def __init__(self, keypoints: int = 17, anchors: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.k, self.na = keypoints, anchors
        self.stem = conv_bn(3, w, 6, 2, act=nn.SiLU, pad=2)
        self.s2 = nn.Sequential(conv_bn(w, 2 * w, 3, 2, act=nn.SiLU), CSPBlock(2 * w, 2 * w, 1))
        self.s3 = nn.Sequential(conv_bn(2 * w, 4 * w, 3, 2, act=nn.SiLU), CSPBlock(4 * w, 4 * w, 2))
        self.s4 = nn.Sequential(conv_bn(4 * w, 8 * w, 3, 2, act=nn.SiLU), CSPBlock(8 * w, 8 * w, 3))
        self.s5 = nn.Sequential(conv_bn(8 * w, 16 * w, 3, 2, act=nn.SiLU), CSPBlock(16 * w, 16 * w, 1))
        self.lat5, self.lat4 = conv_bn(16 * w, 8 * w, 1, act=nn.SiLU), conv_bn(8 * w, 4 * w, 1, act=nn.SiLU)
        self.up4, self.up3 = CSPBlock(16 * w, 8 * w, 1), CSPBlock(8 * w, 4 * w, 1)
        outs = anchors * (5 + 3 * keypoints)
        self.heads = nn.ModuleList([nn.Conv2d(c, outs, 1) for c in (4 * w, 8 * w, 16 * w)])

    def forward(self, x):
        c3 = self.s3(self.s2(self.stem(x)))
        c4 = self.s4(c3)
        c5 = self.s5(c4)
        p5 = self.lat5(c5)
        p4 = self.up4(torch.cat([F.interpolate(p5, scale_factor=2.0, mode="nearest"), c4], 1))
        p3 = self.up3(torch.cat([F.interpolate(self.lat4(p4), scale_factor=2.0, mode="nearest"), c3], 1))
        preds = []
        for head, feat, stride in zip(self.heads, (p3, p4, c5), (8, 16, 32)):
            b, _, h, w = feat.shape
            p = head(feat).view(b, self.na, 5 + 3 * self.k, h, w).permute(0, 1, 3, 4, 2).reshape(b, -1, 5 + 3 * self.k)
            gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
            grid = torch.stack([gx, gy], -1).reshape(1, 1, h * w, 2).expand(b, self.na, h * w, 2).reshape(b, -1, 2)
            xy = (p[..., 0:2].sigmoid() * 2 - 0.5 + grid) * stride
            wh = (p[..., 2:4].sigmoid() * 2) ** 2 * stride * 4
            kp = p[..., 5:].view(b, -1, self.k, 3)
            kxy = (kp[..., :2] * 2 * stride) + xy.unsqueeze(2)
            kpts = torch.cat([kxy, kp[..., 2:].sigmoid()], -1).flatten(2)
            preds.append(torch.cat([xy, wh, p[..., 4:5].sigmoid(), kpts], -1))
        return torch.cat(preds, 1)  # (batch, anchors over all strides, 5 + 3K)


# -- 3-D scene completion (SCONet-like) -----------------------------------------------------

def conv3d_bn(cin: int, cout: int, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, s, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class Res3d(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(conv3d_bn(c, c), nn.Conv3d(c, c, 3, 1, 1, bias=False), nn.BatchNorm3d(c))

    def forward(self, x):
        return F.relu(x + self.body(x))


class SceneCompletionNet(nn.Module):
    """Occupancy grid (B, 1, Z, Y, X) -> per-voxel class logits (B, classes, Z, Y, X)."""

    def __init__(self, classes: int = 20, width: int = 16):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(conv3d_bn(1, w), Res3d(w))
        self.enc2 = nn.Sequential(conv3d_bn(w, 2 * w, 2), Res3d(2 * w))
        self.enc3 = nn.Sequential(conv3d_bn(2 * w, 4 * w, 2), Res3d(4 * w), Res3d(4 * w))
        self.up3 = nn.ConvTranspose3d(4 * w, 2 * w, 2, 2)
        self.dec2 = nn.Sequential(conv3d_bn(4 * w, 2 * w), Res3d(2 * w))
        self.up2 = nn.ConvTranspose3d(2 * w, w, 2, 2)
        self.dec1 = nn.Sequential(conv3d_bn(2 * w, w), Res3d(w))
        self.classify = nn.Conv3d(w, classes, 1)

    def forward(self, occupancy):
        e1 = self.enc1(occupancy)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up3(e3), e2], 1))
        d1 = self.dec1(torch.cat([self.up2(d2), e1], 1))
        return self.classify(d1)


def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Give batch norms non-trivial running statistics, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model
