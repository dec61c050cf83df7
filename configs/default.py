"""Every configuration field, documented once. Protocol files override only what differs.

Use: `python train.py --config configs/aircraft.py --workdir runs/air`, and override any
field on the command line, e.g. `--config.model.arch=resnet50 --config.gcp.grad=pade`.
"""

from ml_collections import config_dict

from gcp_jax.data import config as data_config

HEADLINE_ARCH = "efficientnet_b5"  # backbone of the protocol configs; "resnet50" is the other variant


def get_config() -> config_dict.ConfigDict:
    """The defaults: FGVC-Aircraft protocol sizes, EfficientNet-B5 backbone, 256-d SEB head."""
    c = config_dict.ConfigDict()

    # --- run ----------------------------------------------------------------------------
    c.seed = 0  # Seeds parameter init, dropout (folded with the step) and the data order.
    c.batch_size = 8  # GLOBAL batch over all devices and processes; divisible by the device count.
    c.eval_batch_size = 0  # Global eval batch; 0 = batch_size. Divisible by the device count.
    c.num_epochs = 50  # Training length in epochs (an epoch = num_train // batch_size steps).
    c.num_train_steps = -1  # Caps the run at this many steps; -1 = num_epochs * steps_per_epoch.
    c.log_every_steps = 50  # Train metrics (loss, top-1, lr, grad norm, images/s) every N steps.
    c.eval_every_epochs = 1  # Evaluate on the whole eval split every N epochs (and at the end); 0 = end only.
    c.checkpoint_every_steps = 1000  # Periodic checkpoint every N steps (also after each eval and at the end); 0 = off.
    c.keep_checkpoints = 2  # Latest checkpoints kept for resuming, besides the best-by-eval one.
    c.eval_only = False  # Evaluate the latest checkpoint in --workdir and exit (no training).
    c.spectrum_every_steps = 500  # Spectrum summary of the train batch to TensorBoard every N steps; 0 = off.
    c.max_nonfinite_steps = 20  # Steps with a non-finite loss/gradient are skipped; more than this stops the run.

    # --- model (gcp_jax.models.create_model) ----------------------------------------------
    c.model = config_dict.ConfigDict()
    c.model.arch = HEADLINE_ARCH  # efficientnet_b0..b7, resnet50, resnet101 (resnet_tiny: demo/tests).
    c.model.head = "gcp"  # "gcp" (covariance head, see gcp.*) or "gap" (global average pooling baseline).
    c.model.pretrained = ""  # ImageNet weights file (Keras .h5, torchvision .pth/.safetensors); "" = random init.
    c.model.dtype = "float32"  # Backbone compute dtype: "float32" or "bfloat16" (the spectral head uses gcp.dtype).
    c.model.dropout_rate = config_dict.placeholder(float)  # Dropout before the classifier; None = the arch's (B5 0.4).
    c.model.drop_connect_rate = config_dict.placeholder(float)  # EfficientNet stochastic depth; None = 0.2 (ResNet: 0).
    c.model.last_stride = 2  # ResNet layer4: 1 = 28x28 maps at 448 px (GCP protocol), 2 = ImageNet's. EffNets: 2.

    # --- GCP head (gcp_jax.pooling.GCPHead) ---------------------------------------------
    c.gcp = config_dict.ConfigDict()
    c.gcp.dim = 256  # 1x1 conv + BN + ReLU reduction to this many channels; 0 = no reduction.
    c.gcp.norm = "seb"  # Matrix normalisation: "sqrt", "seb" (Scaling Eigen Branch), "isqrt" (Newton-Schulz), "none".
    c.gcp.grad = "exact"  # Eigen backward: exact, ordinary, pade, taylor, trunc, newton (METHOD.md §3).
    c.gcp.seb_variant = "code"  # SEB form: "code" (released code), "a", "b" (METHOD.md §2c).
    c.gcp.eps = config_dict.placeholder(float)  # Eigenvalue clamp; None = eps32 * lambda_max (float64: eps64).
    c.gcp.isqrt_iters = 5  # Newton-Schulz iterations of norm="isqrt".
    c.gcp.newton_iters = 10  # Iterations of the grad="newton" backward.
    c.gcp.taylor_degree = 100  # Series degree of grad="taylor".
    c.gcp.trunc_threshold = 1e10  # |K| clip of grad="trunc".
    c.gcp.topn = 0  # SVD-TopN: the n smallest eigenvalues set to eps in the forward (0 = off).
    c.gcp.dtype = "float32"  # Spectral dtype: "float32" or "float64" (turns on jax_enable_x64; faithful reproduction).

    # --- data (gcp_jax.data) ----------------------------------------------------------
    # The fields and their documentation live with the input pipeline, gcp_jax/data/config.py:
    # name, data_dir, manual_dir, image_size, resize_size, resize_mode, random_crop, train_split,
    # eval_split, shuffle_buffer, on_corrupt, cache, synthetic.{num_classes, train_per_class,
    # test_per_class, image_size}. The number of classes comes from the data set's metadata.
    c.data = data_config.default_config()

    # --- optimiser (gcp_jax.training.make_optimizer) ------------------------------------------
    c.optim = config_dict.ConfigDict()
    c.optim.learning_rate = 3e-3  # Base learning rate of the backbone and the GCP reduction.
    c.optim.momentum = 0.9  # SGD momentum, PyTorch form: b <- momentum * b + g; theta <- theta - lr * b.
    c.optim.nesterov = False  # Nesterov momentum (PyTorch's nesterov=True form).
    c.optim.classifier_lr_factor = 5.0  # Learning rate x this for params["classifier"] (the final dense layer).
    c.optim.weight_decay = 1e-3  # Added to the CLIPPED gradient on all parameters: g <- clip(g) + wd * theta.
    c.optim.grad_clip_norm = 5.0  # Clip the global gradient norm (before weight decay); 0 = off.
    c.optim.schedule = "step"  # "step" (x decay_factor at each of decay_epochs) or "cosine" (to 0 at the end).
    c.optim.decay_epochs = (21, 40)  # Epochs at which the step schedule multiplies the lr by decay_factor.
    c.optim.decay_factor = 0.1  # Step-schedule factor.
    c.optim.warmup_epochs = 0.0  # Linear warmup from 0 over this many epochs (either schedule).
    return c


def with_backbone(config: config_dict.ConfigDict, arch: str) -> config_dict.ConfigDict:
    """`config` with backbone `arch` (a protocol file's `:variant`).

    ResNets get layer4 at stride 1: 28x28 = 784 positions at 448 px, so the 256-d covariance is
    full rank (the GCP protocol, METHOD.md §6). EfficientNets keep their strides (14x14 at 448 px).
    """
    config.model.arch = arch
    config.model.last_stride = 1 if arch.startswith("resnet") else 2
    return config
