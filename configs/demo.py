"""The demo: a generated fine-grained data set, a tiny ResNet with the SEB head, ~2 min on 2 CPU cores.

  python train.py                       # same as --config configs/demo.py --workdir runs/demo

No download: the synthetic_fgvc data set (10 classes told apart by the orientation and the
colour correlation of textures, i.e. by second-order statistics) is generated on first use.
"""

from gcp_jax import config as base


def get_config():
    c = base.get_config()
    c.data.name = "synthetic_fgvc"
    c.data.synthetic.update(num_classes=10, train_per_class=300, test_per_class=50, image_size=64)
    c.data.resize_mode, c.data.resize_size, c.data.image_size = "square", 64, 64
    c.data.random_crop = False
    c.data.train_split, c.data.eval_split = "train", "test"
    c.model.arch, c.model.last_stride = "resnet_tiny", 1  # 8x8 maps: 64 positions, a full-rank 32-d covariance
    c.gcp.dim = 32
    c.batch_size, c.eval_batch_size, c.num_epochs = 32, 128, 6
    c.log_every_steps, c.checkpoint_every_steps, c.spectrum_every_steps = 20, 0, 100
    c.optim.learning_rate = 0.05
    c.optim.classifier_lr_factor = 1.0
    c.optim.weight_decay = 1e-4
    c.optim.schedule = "cosine"
    c.optim.decay_epochs = ()
    c.optim.warmup_epochs = 0.5
    return c
