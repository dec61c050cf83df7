"""What the weight-import tests share: images, the parity measure, randomised BatchNorm statistics.

The PyTorch models they compare with are bench/torch_models.py's (shared with the benchmarks).
"""

import numpy as np
import torch
from torch import nn

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def raw_images(n=2, size=64, seed=0):
    """Random RGB images in [0, 255], NHWC float32."""
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def normalised(raw):
    """(x/255 − ImageNet mean)/std, the input of every gcp_jax and reference model."""
    return (raw / 255.0 - MEAN) / STD


def nchw(images, dtype=torch.float32):
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).to(dtype)


def relative_error(ours, reference) -> float:
    """max |ours − reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def assert_close(ours, reference, rtol=1e-4):
    err = relative_error(ours, reference)
    assert err <= rtol, f"relative error {err:.2e}"


def randomised(factory, seed=0):
    """`factory()` in eval mode, made with torch seed `seed`, its BatchNorm affine parameters and running
    statistics random too (convolutions keep PyTorch's init), so that each tensor and its place matter."""
    torch.manual_seed(seed)
    model = factory()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()
