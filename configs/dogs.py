"""Stanford Dogs (120 breeds, 12,000 train / 8,580 test).

The reference scripts have no Dogs protocol; this one reuses the CUB-200 settings (shorter side
448, centre crop 448, batch 10, 200 epochs, lr x0.1 at 50 and 100, weight decay 1e-4,
classifier lr x20), the closest data set in size and kind.

  python train.py --config configs/dogs.py --workdir runs/dogs             # EfficientNet-B5 + SEB
  python train.py --config configs/dogs.py:resnet50 --workdir runs/dogs_r50  # ResNet-50 (stride-1 layer4) + SEB
"""

from configs import cub
from gcp_jax import config as base


def get_config(variant: str = base.HEADLINE_ARCH):
    c = cub.get_config(variant)
    c.data.name = "stanford_dogs"
    c.data.train_split, c.data.eval_split = "train", "test"
    return c
