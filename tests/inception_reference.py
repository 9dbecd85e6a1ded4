"""PyTorch reference of pytorch-fid's FID InceptionV3 (pool3 features), for the parity tests only.

pytorch-fid imports torchvision, which cannot be installed beside torch 2.13 in this environment, so the network
is written out here from the two published sources it is made of:

  - torchvision/models/inception.py (pytorch/vision@02a0a90b7ad1e9d69f1f392ad6701eb069f7db02): `BasicConv2d`,
    `InceptionA`..`InceptionE`, `InceptionAux`, `Inception3` (module names and layer order kept, so the state
    dicts have the real key layout);
  - src/pytorch_fid/inception.py (mseitzer/pytorch-fid@b9c18118d082cbd263c1b8963fc4221dc1cbb659): `FIDInceptionA`,
    `FIDInceptionC`, `FIDInceptionE_1`, `FIDInceptionE_2` (avg pools with count_include_pad=False, a max pool in
    Mixed_7c), `fid_inception_v3()` (Inception3(num_classes=1008, aux_logits=False) with those blocks) and
    `InceptionV3.forward` (bilinear resize to 299 with align_corners=False, 2x - 1, the block sequence up to the
    final adaptive average pool).

`width` scales every channel count exactly like `pixart_jax.metrics.inception.InceptionConfig.ch` so the tests
can run tiny networks; width 1 is the real architecture (23.85 M parameters with the 1008-way fc).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _ch(width: float):
  return lambda c: max(1, int(round(c * width)))


class BasicConv2d(nn.Module):
  def __init__(self, in_channels, out_channels, **kwargs):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
    self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
  def __init__(self, in_channels, pool_features, c, fid):
    super().__init__()
    self.fid = fid
    self.branch1x1 = BasicConv2d(in_channels, c(64), kernel_size=1)
    self.branch5x5_1 = BasicConv2d(in_channels, c(48), kernel_size=1)
    self.branch5x5_2 = BasicConv2d(c(48), c(64), kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, c(64), kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(in_channels, c(pool_features), kernel_size=1)
    self.out_channels = c(64) + c(64) + c(96) + c(pool_features)

  def forward(self, x):
    branch1x1 = self.branch1x1(x)
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    # FIDInceptionA: "Tensorflow's average pool does not use the padded zero's in its average calculation"
    branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=not self.fid)
    return torch.cat([branch1x1, branch5x5, branch3x3dbl, self.branch_pool(branch_pool)], 1)


class InceptionB(nn.Module):
  def __init__(self, in_channels, c):
    super().__init__()
    self.branch3x3 = BasicConv2d(in_channels, c(384), kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, c(64), kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, stride=2)
    self.out_channels = c(384) + c(96) + in_channels

  def forward(self, x):
    branch3x3 = self.branch3x3(x)
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([branch3x3, branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
  def __init__(self, in_channels, channels_7x7, c, fid):
    super().__init__()
    self.fid = fid
    c7 = c(channels_7x7)
    self.branch1x1 = BasicConv2d(in_channels, c(192), kernel_size=1)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, c(192), kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, c(192), kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(in_channels, c(192), kernel_size=1)
    self.out_channels = 4 * c(192)

  def forward(self, x):
    branch1x1 = self.branch1x1(x)
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    branch7x7dbl = self.branch7x7dbl_1(x)
    branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl)
    branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl)
    branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl)
    branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)
    branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=not self.fid)  # FIDInceptionC
    return torch.cat([branch1x1, branch7x7, branch7x7dbl, self.branch_pool(branch_pool)], 1)


class InceptionD(nn.Module):
  def __init__(self, in_channels, c):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(in_channels, c(192), kernel_size=1)
    self.branch3x3_2 = BasicConv2d(c(192), c(320), kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(in_channels, c(192), kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(c(192), c(192), kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(c(192), c(192), kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(c(192), c(192), kernel_size=3, stride=2)
    self.out_channels = c(320) + c(192) + in_channels

  def forward(self, x):
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
    branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
  """pool: 'avg' (torchvision InceptionE), 'avg_fid' (FIDInceptionE_1), 'max' (FIDInceptionE_2)."""

  def __init__(self, in_channels, c, pool):
    super().__init__()
    self.pool = pool
    self.branch1x1 = BasicConv2d(in_channels, c(320), kernel_size=1)
    self.branch3x3_1 = BasicConv2d(in_channels, c(384), kernel_size=1)
    self.branch3x3_2a = BasicConv2d(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(in_channels, c(448), kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(c(448), c(384), kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(in_channels, c(192), kernel_size=1)
    self.out_channels = c(320) + 4 * c(384) + c(192)

  def forward(self, x):
    branch1x1 = self.branch1x1(x)
    branch3x3 = self.branch3x3_1(x)
    branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
    if self.pool == "max":  # FIDInceptionE_2: "The FID Inception model uses max pooling instead of average pooling"
      branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    else:
      branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=self.pool == "avg")
    return torch.cat([branch1x1, branch3x3, branch3x3dbl, self.branch_pool(branch_pool)], 1)


class InceptionAux(nn.Module):
  """torchvision's auxiliary classifier (its weights are in torchvision-layout state dicts; never run here)."""

  def __init__(self, in_channels, num_classes, c):
    super().__init__()
    self.conv0 = BasicConv2d(in_channels, c(128), kernel_size=1)
    self.conv1 = BasicConv2d(c(128), c(768), kernel_size=5)
    self.fc = nn.Linear(c(768), num_classes)


class Inception3(nn.Module):
  """torchvision's Inception3 module tree. fid=True swaps in pytorch-fid's blocks (`fid_inception_v3()`)."""

  def __init__(self, num_classes=1008, aux_logits=False, fid=True, width=1.0):
    super().__init__()
    c = _ch(width)
    self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), kernel_size=3, padding=1)
    self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
    self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), kernel_size=3)
    self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
    self.Mixed_5b = InceptionA(c(192), 32, c, fid)
    self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, 64, c, fid)
    self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, 64, c, fid)
    self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, c)
    self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, 128, c, fid)
    self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, 160, c, fid)
    self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, 160, c, fid)
    self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, 192, c, fid)
    self.AuxLogits = InceptionAux(self.Mixed_6e.out_channels, num_classes, c) if aux_logits else None
    self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, c)
    self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, c, "avg_fid" if fid else "avg")
    self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, c, "max" if fid else "avg")
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.dropout = nn.Dropout(p=0.5)
    self.fc = nn.Linear(self.Mixed_7c.out_channels, num_classes)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
  """Random weights AND random BatchNorm statistics (weights ~ N(0, 1/fan_in), BN gamma/beta/mean/var random)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.2 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
        m.num_batches_tracked.fill_(1000)
      elif isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features ** -0.5)
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
  return model.eval()


@torch.no_grad()
def pytorch_fid_features(inception: Inception3, images: torch.Tensor, resize_input=True,
                         normalize_input=True) -> torch.Tensor:
  """pytorch-fid `InceptionV3([3])(images)[0]` squeezed: images B 3 H W in [0, 1] -> B 2048 (pool3)."""
  x = images
  if resize_input:
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
  if normalize_input:
    x = 2 * x - 1
  m = inception
  blocks = [m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            m.Conv2d_3b_1x1, m.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2),
            m.Mixed_5b, m.Mixed_5c, m.Mixed_5d, m.Mixed_6a, m.Mixed_6b, m.Mixed_6c, m.Mixed_6d, m.Mixed_6e,
            m.Mixed_7a, m.Mixed_7b, m.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1))]
  for block in blocks:
    x = block(x)
  return x[:, :, 0, 0]
