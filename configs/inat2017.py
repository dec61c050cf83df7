"""iNaturalist 2017 (5,089 species, 579,184 train / 95,986 validation images).

The SEB paper reports 72.3 % top-1 with EfficientNet-B5 but its iNaturalist schedule is not
known (docs/method.md §7, unverified). This config is ours: the FGVC recipe scaled to a large data
set -- global batch 64 with the learning rate scaled linearly from 3e-3 at batch 8, random
448 crops of the shorter side resized to 512, 30 epochs with lr x0.1 at 10 and 20, one epoch of
warmup, weight decay 1e-4, classifier lr x5, evaluation every 2 epochs on the validation split.

  python train.py --config configs/inat2017.py --workdir runs/inat             # EfficientNet-B5 + SEB
  python train.py --config configs/inat2017.py:resnet50 --workdir runs/inat_r50  # ResNet-50 (stride-1 layer4) + SEB
"""

from gcp_jax import config as base


def get_config(variant: str = base.HEADLINE_ARCH):
    c = base.get_config()
    c.data.name = "i_naturalist2017"
    c.data.train_split, c.data.eval_split = "train", "validation"
    c.data.resize_mode, c.data.resize_size, c.data.image_size = "shorter", 512, 448
    c.data.random_crop = True
    c.batch_size, c.eval_batch_size, c.num_epochs = 64, 128, 30
    c.eval_every_epochs = 2
    c.checkpoint_every_steps = 2000
    c.optim.learning_rate = 0.024
    c.optim.warmup_epochs = 1.0
    c.optim.decay_epochs = (10, 20)
    c.optim.weight_decay = 1e-4
    c.optim.classifier_lr_factor = 5.0
    return base.with_backbone(c, variant)
