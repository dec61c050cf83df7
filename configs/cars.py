"""Stanford Cars (196 models, 8,144 train / 8,041 test), docs/method.md §6 protocol.

python train.py --config configs/cars.py --workdir runs/cars             # EfficientNet-B5 + SEB
python train.py --config configs/cars.py:resnet50 --workdir runs/cars_r50  # ResNet-50 (stride-1 layer4) + SEB
python train.py --config configs/cars.py:isqrt_resnet50 --workdir runs/cars_isqrt \
    --config.model.pretrained=mpncovresnet50-15991845.pth  # fast-MPN-COV's recipe (published 92.8)

:isqrt_resnet50 fine-tunes fast-MPN-COV's ImageNet iSQRT-COV ResNet-50 as its finetune.sh does
(gcp_jax.config.with_isqrt_finetuning) and evaluates each centre crop with its mirror image (eval_flip).
Its evaluation resizes the shorter side to 448 and takes the centre 448 (for an eval_only run as
theirs: --config.data.resize_mode=shorter); here eval keeps this protocol's (448, 448), as its training does.

python train.py --config configs/cars.py:isice_resnet50 --workdir runs/cars_isice \
    --config.model.pretrained=resnet50-19c8e357.pth  # iSICE's recipe (published 93.5)
python train.py --config configs/cars.py:mpa_resnet50 --workdir runs/cars_mpa  # :resnet50 with MPA-Lya

:isice_resnet50 is the recipe of csiro-robotics/iSICE (gcp_jax.config.with_isice_recipe: torchvision
ResNet-50 at its own strides, iSICE head, AdamW); :mpa_resnet50 is :resnet50 with gcp.norm="mpa".
"""

from gcp_jax import config as base


def get_config(variant: str = base.HEADLINE_ARCH):
    c = base.get_config()
    c.data.name = "stanford_cars"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.resize_mode, c.data.resize_size, c.data.image_size = "square", 448, 448  # (448, 448), no crop
    c.data.random_crop = False  # horizontal flip only
    c.batch_size, c.num_epochs = 10, 200
    c.optim.decay_epochs = (50, 100)
    c.optim.weight_decay = 1e-4
    c.optim.classifier_lr_factor = 10.0
    return base.with_variant(c, variant)
