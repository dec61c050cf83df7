"""PyTorch models of the layouts gcp_jax reads: the weight-import tests' references and the benchmark's recipe.

The models are written here from the layout facts (module names and order, as the state-dict keys
show them) and the math of docs/method.md, independently of gcp_jax and of the reference code:

* `ResNet`: torchvision's ResNet-50 (stride in the 3×3 conv, BN eps 1e-5); children `conv1, bn1,
  relu, maxpool, layer1…layer4, avgpool, fc`, layer4 at stride 2 or 1.
* `MPNCOVResNet`: fast-MPN-COV's model-zoo network: the ResNet with layer4 at stride 1, then
  `layer_reduce` (1×1 conv 2048 → 256, no bias), `layer_reduce_bn`, `layer_reduce_relu`,
  covariance, iSQRT (5 Newton–Schulz steps), the row-major upper triangle and `fc`.
* `Newmodel`: the `main.py` model of fast-MPN-COV and DifferentiableSVD: `features` (an
  nn.Sequential of a network's children), `representation` (`ISqrtCov` or `SEB`, each with an
  optional `conv_dr_block` reduction) and `classifier`.
"""

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------
# ResNet-50 (torchvision layout)


class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.downsample = None
        if stride != 1 or inplanes != 4 * planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, 4 * planes, 1, stride=stride, bias=False), nn.BatchNorm2d(4 * planes)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet50_trunk(last_stride):
    """[(name, module)] of ResNet-50 from `conv1` to `layer4`, in torchvision's child order."""
    trunk = [
        ("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)),
        ("bn1", nn.BatchNorm2d(64)),
        ("relu", nn.ReLU()),
        ("maxpool", nn.MaxPool2d(3, stride=2, padding=1)),
    ]
    inplanes = 64
    for i, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        first_stride = 1 if i == 0 else (last_stride if i == 3 else 2)
        layer = []
        for j in range(blocks):
            layer.append(Bottleneck(inplanes, planes, first_stride if j == 0 else 1))
            inplanes = 4 * planes
        trunk.append((f"layer{i + 1}", nn.Sequential(*layer)))
    return trunk


class ResNet(nn.Module):
    """torchvision's ResNet-50 with global average pooling and `fc`."""

    def __init__(self, num_classes=1000, last_stride=2):
        super().__init__()
        for name, module in resnet50_trunk(last_stride):
            self.add_module(name, module)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        for name, module in self.named_children():
            if name == "fc":
                return module(x.flatten(1))
            x = module(x)


# ----------------------------------------------------------------------------------------------
# Second-order pooling


def covariance(x):
    """[B, C, H, W] → Σ = X Î Xᵀ [B, C, C] with the centring matrix Î = I/M − 11ᵀ/M² (M = H·W)."""
    b, c, h, w = x.shape
    m = h * w
    centring = torch.eye(m, dtype=x.dtype) / m - torch.full((m, m), 1.0 / (m * m), dtype=x.dtype)
    x = x.reshape(b, c, m)
    return x @ centring @ x.transpose(1, 2)


def isqrt(sigma, iters=5):
    """iSQRT-COV: Newton–Schulz on Σ/tr Σ, coupled Y (→ root) and Z (→ inverse root), then × √tr Σ."""
    trace = sigma.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None]
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype).expand_as(sigma)
    y, z = sigma / trace, eye
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * trace.sqrt()


def seb(sigma):
    """DifferentiableSVD's SEB forward as its code computes it (float64): Σ's SVD taken as its eigendecomposition,
    values ≤ ε set to ε, Q = Σ^{1/2}, S = e^{−Σ}, A = Q Sᵀ, N = A/‖A‖_F, and Q ∘ (A ⊘ N) + Q."""
    _, s, vh = torch.linalg.svd(sigma)
    eps = torch.finfo(sigma.dtype).eps
    s = torch.where(s <= eps, torch.full_like(s, eps), s)
    v = vh.transpose(1, 2)
    q = v @ torch.diag_embed(s.sqrt()) @ vh
    a = q @ (v @ torch.diag_embed(torch.exp(-s)) @ vh).transpose(1, 2)
    n = a / a.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
    return q * (a / n) + q


def triu(m):
    """The upper triangle with the diagonal, row by row: [B, d, d] → [B, d(d+1)/2]."""
    d = m.shape[-1]
    return m[:, torch.ones(d, d, dtype=torch.bool).triu()]


def reduction(in_channels, dim):
    """The 1×1 conv (no bias) + BN + ReLU that both codes put before the covariance."""
    return nn.Sequential(nn.Conv2d(in_channels, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU())


class MPNCOVResNet(nn.Module):
    """fast-MPN-COV's `mpncovresnet50`: ResNet-50 (layer4 stride 1) + 256-d reduction + iSQRT-COV + `fc`."""

    def __init__(self, num_classes=1000, dim=256):
        super().__init__()
        for name, module in resnet50_trunk(last_stride=1):
            self.add_module(name, module)
        conv, bn, relu = reduction(2048, dim)
        self.layer_reduce, self.layer_reduce_bn, self.layer_reduce_relu = conv, bn, relu
        self.fc = nn.Linear(dim * (dim + 1) // 2, num_classes)

    def forward(self, x):
        for name, module in self.named_children():
            if name == "fc":
                return module(triu(isqrt(covariance(x))))
            x = module(x)


class ISqrtCov(nn.Module):
    """The MPNCOV representation of main.py (iSQRT, 5 steps), with `conv_dr_block` when `dim` is given."""

    def __init__(self, in_channels, dim=None):
        super().__init__()
        if dim:
            self.conv_dr_block = reduction(in_channels, dim)

    def forward(self, x):
        if hasattr(self, "conv_dr_block"):
            x = self.conv_dr_block(x)
        return triu(isqrt(covariance(x)))


class SEB(nn.Module):
    """DifferentiableSVD's SEB representation: reduction in the input's precision, the rest in float64."""

    def __init__(self, in_channels, dim):
        super().__init__()
        self.conv_dr_block = reduction(in_channels, dim)

    def forward(self, x):
        return triu(seb(covariance(self.conv_dr_block(x).double())))


class Newmodel(nn.Module):
    """main.py's model: `features` → `representation` → `classifier` (in the classifier's precision)."""

    def __init__(self, features, representation, classifier):
        super().__init__()
        self.features, self.representation, self.classifier = features, representation, classifier

    def forward(self, x):
        pooled = self.representation(self.features(x)).flatten(1)
        return self.classifier(pooled.to(self.classifier.weight.dtype))
