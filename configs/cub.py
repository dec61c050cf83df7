"""CUB-200-2011 (200 species, 5,994 train / 5,794 test), docs/method.md §6 protocol.

python train.py --config configs/cub.py --workdir runs/cub             # EfficientNet-B5 + SEB
python train.py --config configs/cub.py:resnet50 --workdir runs/cub_r50  # ResNet-50 (stride-1 layer4) + SEB
python train.py --config configs/cub.py:isqrt_resnet50 --workdir runs/cub_isqrt \
    --config.model.pretrained=mpncovresnet50-15991845.pth  # fast-MPN-COV's recipe (published 88.1)

:isqrt_resnet50 fine-tunes fast-MPN-COV's ImageNet iSQRT-COV ResNet-50 as its finetune.sh does
(gcp_jax.config.with_isqrt_finetuning) and evaluates each centre crop with its mirror image (eval_flip).
Its resize/crop is this protocol's (shorter side 448, centre 448), its final evaluation's included.

python train.py --config configs/cub.py:isice_resnet50 --workdir runs/cub_isice \
    --config.model.pretrained=resnet50-19c8e357.pth  # iSICE's recipe (published 85.9)
python train.py --config configs/cub.py:mpa_resnet50 --workdir runs/cub_mpa  # :resnet50 with MPA-Lya

:isice_resnet50 is the recipe of csiro-robotics/iSICE (gcp_jax.config.with_isice_recipe: torchvision
ResNet-50 at its own strides, iSICE head, AdamW); :mpa_resnet50 is :resnet50 with gcp.norm="mpa".
"""

from gcp_jax import config as base


def get_config(variant: str = base.HEADLINE_ARCH):
    c = base.get_config()
    c.data.name = "caltech_birds2011"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.resize_mode, c.data.resize_size, c.data.image_size = "shorter", 448, 448  # shorter side 448, centre crop 448
    c.data.random_crop = False  # horizontal flip only
    c.batch_size, c.num_epochs = 10, 200
    c.optim.decay_epochs = (50, 100)
    c.optim.weight_decay = 1e-4
    c.optim.classifier_lr_factor = 20.0
    return base.with_variant(c, variant)
