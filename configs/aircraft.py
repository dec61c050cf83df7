"""FGVC-Aircraft (100 variants, 6,667 trainval / 3,333 test), docs/method.md §6 protocol.

python train.py --config configs/aircraft.py --workdir runs/air             # EfficientNet-B5 + SEB
python train.py --config configs/aircraft.py:resnet50 --workdir runs/air_r50  # ResNet-50 (stride-1 layer4) + SEB
"""

from gcp_jax import config as base


def get_config(variant: str = base.HEADLINE_ARCH):
    c = base.get_config()
    c.data.name = "fgvc_aircraft/variant"
    c.data.train_split, c.data.eval_split = "trainval", "test"
    c.data.resize_mode, c.data.resize_size, c.data.image_size = "square", 512, 448  # (512, 512), centre crop 448
    c.data.random_crop = False  # horizontal flip only
    c.batch_size, c.num_epochs = 8, 50
    c.optim.decay_epochs = (21, 40)
    c.optim.weight_decay = 1e-3
    c.optim.classifier_lr_factor = 5.0
    return base.with_backbone(c, variant)
