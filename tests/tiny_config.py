"""The demo config at test sizes; also a config file: `--config tests/tiny_config.py:<data_dir>`.

resnet_tiny + 8-d SEB head, 4 classes x 8 train / 5 test images of 32 px, batch 8: 4 steps per
epoch, 2 epochs (evaluations at steps 4 and 8), train metrics every 2 steps.
"""

from configs import demo


def get_config(data_dir: str = ""):
    c = demo.get_config()
    c.data.data_dir = data_dir
    c.data.synthetic.update(num_classes=4, train_per_class=8, test_per_class=5, image_size=32)
    c.data.resize_size = c.data.image_size = 32
    c.gcp.dim = 8
    c.batch_size = c.eval_batch_size = 8
    c.num_epochs, c.log_every_steps = 2, 2
    return c
