"""FGVC-Aircraft (100 variants, 6,667 trainval / 3,333 test), docs/method.md §6 protocol.

python train.py --config configs/aircraft.py --workdir runs/air             # EfficientNet-B5 + SEB
python train.py --config configs/aircraft.py:resnet50 --workdir runs/air_r50  # ResNet-50 (stride-1 layer4) + SEB
python train.py --config configs/aircraft.py:isqrt_resnet50 --workdir runs/air_isqrt \
    --config.model.pretrained=mpncovresnet50-15991845.pth  # fast-MPN-COV's recipe (published 90.0)

:isqrt_resnet50 fine-tunes fast-MPN-COV's ImageNet iSQRT-COV ResNet-50 as its finetune.sh does
(gcp_jax.config.with_isqrt_finetuning) and evaluates each centre crop with its mirror image (eval_flip).
Its final evaluation resizes the shorter side to 448 (for an eval_only run as theirs:
--config.data.resize_mode=shorter --config.data.resize_size=448); here eval keeps this protocol's
(512, 512) → centre 448, as its training and per-epoch validation do.
"""

from gcp_jax import config as base


def get_config(variant: str = base.HEADLINE_ARCH):
    """gcp_jax.config's defaults are this protocol's (data set, splits, sizes, batch 8, 50 epochs, SGD with steps
    at epochs 21 and 40, weight decay 1e-3, classifier lr x5); Aircraft resizes both sides and crops at the centre."""
    c = base.get_config()
    c.data.resize_mode = "square"  # (512, 512), centre crop 448
    c.data.random_crop = False  # horizontal flip only
    return base.with_variant(c, variant)
