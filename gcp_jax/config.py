"""The run configuration: every field documented once here, and one `validate()` for all of them.

`python train.py --config configs/aircraft.py --workdir runs/air` loads a protocol file whose
`get_config()` starts from `get_config()` below and overrides only what differs; any field can be
overridden on the command line, e.g. `--config.model.arch=resnet50 --config.gcp.grad=pade`.
The GCP head's defaults are `gcp_jax.linalg.SpectralOptions`' and `gcp_jax.pooling.GCPHead`'s.
"""

from __future__ import annotations

import functools
import numbers
import os
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from ml_collections import config_dict

from gcp_jax import checks, compile_cache, linalg, models, optim, pooling

HEADLINE_ARCH = "efficientnet_b5"  # backbone of the protocol configs; "resnet50" is the other variant
ISQRT_VARIANT = "isqrt_resnet50"  # Aircraft/CUB/Cars variant: fast-MPN-COV's fine-tuning of mpncovresnet50
RESIZE_MODES = ("shorter", "square")
ON_CORRUPT = ("skip", "fail")


class ConfigError(ValueError):
    """The config has impossible values or unknown fields; the message lists every problem."""


def get_config() -> config_dict.ConfigDict:
    """The defaults: the FGVC-Aircraft protocol (configs/aircraft.py adds only its square resize and centre
    train crop), EfficientNet-B5 backbone, 256-d SEB head."""
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
    c.eval_only = False  # Evaluate the latest checkpoint in --workdir (if none: model.pretrained as loaded) and exit.
    c.eval_flip = False  # Eval also on the mirrored images, averaging the two logits; records both accuracies.
    c.spectrum_every_steps = 500  # Spectrum summary of the train batch to TensorBoard every N steps; 0 = off.
    c.max_nonfinite_steps = 20  # Steps with a non-finite loss/gradient are skipped; more than this stops the run.
    c.step_timeout_s = 1800  # Watchdog: no train step done in this many seconds -> dump all stacks, exit 124; 0 = off.
    c.compile_cache_dir = compile_cache.DEFAULT  # Compiled steps kept for later runs; a directory; "" = off.
    c.allow_config_change = False  # Resume although the model/data/optimiser fields differ from the run's saved config.

    # --- model (gcp_jax.models.create_model) ----------------------------------------------
    c.model = config_dict.ConfigDict()
    c.model.arch = HEADLINE_ARCH  # efficientnet_b0..b7, resnet50, resnet101 (resnet_tiny: demo/tests).
    c.model.head = "gcp"  # "gcp" (covariance head, see gcp.*) or "gap" (global average pooling baseline).
    c.model.pretrained = ""  # Weight file: Keras, torchvision, fast-MPN-COV, DifferentiableSVD; "" = random.
    c.model.dtype = "float32"  # Backbone compute dtype: "float32", "bfloat16" or "float64" (the head uses gcp.dtype).
    c.model.dropout_rate = config_dict.placeholder(float)  # Dropout before the classifier; None = the arch's (B5 0.4).
    c.model.drop_connect_rate = config_dict.placeholder(float)  # EfficientNet stochastic depth; None = 0.2 (ResNet: 0).
    c.model.last_stride = 2  # ResNet layer4: 1 = 28x28 maps at 448 px (GCP protocol), 2 = ImageNet's. EffNets: 2.

    # --- GCP head (gcp_jax.pooling.GCPHead, gcp_jax.linalg.SpectralOptions) -----------------
    s = linalg.SpectralOptions()
    c.gcp = config_dict.ConfigDict()
    c.gcp.dim = pooling.GCPHead.dim  # 1x1 conv + BN + ReLU reduction to this many channels (256); 0 = no reduction.
    c.gcp.norm = s.norm  # Matrix normalisation: "sqrt", "seb" (Scaling Eigen Branch), "isqrt" (Newton-Schulz), "none".
    c.gcp.grad = s.grad  # Eigen backward: exact, ordinary, pade, taylor, trunc, newton (docs/method.md §3).
    c.gcp.seb_variant = s.seb_variant  # SEB form: "code" (released code), "a", "b" (docs/method.md §2c).
    c.gcp.eps = config_dict.placeholder(float)  # Eigenvalue clamp; None = eps32 * lambda_max (float64: eps64).
    c.gcp.topn = s.topn  # SVD-TopN: the n smallest eigenvalues set to eps in the forward (0 = off).
    c.gcp.isqrt_iters = s.isqrt_iters  # Newton-Schulz iterations of norm="isqrt" (5).
    c.gcp.newton_iters = s.newton_iters  # Iterations of the grad="newton" backward (10).
    c.gcp.taylor_degree = s.taylor_degree  # Series degree of grad="taylor" (100).
    c.gcp.trunc_threshold = s.trunc_threshold  # |K| clip of grad="trunc" (1e10).
    c.gcp.dtype = s.dtype  # Spectral dtype: "float32" or "float64" (turns on jax_enable_x64; faithful reproduction).

    # --- data (gcp_jax.data) ----------------------------------------------------------------
    c.data = data_config()

    # --- optimiser (gcp_jax.optim.make_optimizer) -------------------------------------------
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


def data_config() -> config_dict.ConfigDict:
    """The `data` fields (gcp_jax.data's input pipeline) with their defaults."""
    d = config_dict.ConfigDict()
    d.name = "fgvc_aircraft/variant"  # TFDS name[/config][:version], "image_folder" or "synthetic_fgvc".
    d.data_dir = ""  # Where prepared TFDS data lives; "" = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    d.manual_dir = ""  # Downloaded archives / image_folder root; "" = <data_dir>/downloads/manual.
    d.image_size = 448  # Side of the square crop fed to the network.
    d.resize_size = 512  # Resize before cropping: the shorter side, or both sides (resize_mode).
    d.resize_mode = "shorter"  # "shorter": keep aspect, shorter side = resize_size; "square": resize_size^2.
    d.random_crop = True  # Train crop: random (True) or centre (False); eval is always the centre crop.
    d.train_split = "trainval"  # TFDS split spec trained on, e.g. "train", "train[:90%]", "train+validation".
    d.eval_split = "test"  # TFDS split spec evaluated on, each example exactly once.
    d.shuffle_buffer = 10_000  # Train shuffle buffer in examples (encoded; decoded+resized when cache=True).
    d.on_corrupt = "skip"  # An undecodable image: "skip" (drop it, count it, log its name) or "fail".
    d.cache = False  # Keep decoded, resized uint8 images in memory after the first pass (small data sets).
    d.synthetic = config_dict.ConfigDict()  # The generated data set, used when name = "synthetic_fgvc".
    d.synthetic.num_classes = 10  # Classes: grating orientation x colour correlation.
    d.synthetic.train_per_class = 300  # Train images per class.
    d.synthetic.test_per_class = 50  # Test images per class.
    d.synthetic.image_size = 64  # Side of the generated images in pixels.
    return d


def with_backbone(config: config_dict.ConfigDict, arch: str) -> config_dict.ConfigDict:
    """`config` with backbone `arch` (a protocol file's `:variant`).

    ResNets get layer4 at stride 1: 28x28 = 784 positions at 448 px, so the 256-d covariance is
    full rank (the GCP protocol, docs/method.md §6). EfficientNets keep their strides (14x14 at 448 px).
    """
    config.model.arch = arch
    if arch in models.ARCHS:  # another is refused by validate(), naming the known ones
        config.model.last_stride = models.family(arch).protocol_last_stride
    return config


def with_variant(config: config_dict.ConfigDict, variant: str) -> config_dict.ConfigDict:
    """`config` with a protocol file's `:variant`: ISQRT_VARIANT (`with_isqrt_finetuning`) or a backbone arch."""
    return with_isqrt_finetuning(config) if variant == ISQRT_VARIANT else with_backbone(config, variant)


def with_isqrt_finetuning(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """`config` with fast-MPN-COV's recipe for fine-tuning its ImageNet `mpncovresnet50` (`:isqrt_resnet50`).

    The model of the model-zoo file (ResNet-50, layer4 at stride 1, 256-d reduction, iSQRT-COV with
    5 Newton-Schulz iterations, no dropout) and the optimiser of its finetune.sh and main.py: batch 10,
    100 epochs, SGD lr 1.2e-3 with momentum 0.9, the one step at epoch 100 (never reached), weight decay
    1e-3 on all parameters, classifier lr x5, no gradient clipping. Eval averages each centre crop's
    logits with its mirror image's. The data transforms stay the protocol's.
    """
    config = with_backbone(config, "resnet50")
    config.model.head, config.model.dropout_rate = "gcp", 0.0
    config.gcp.update(dim=256, norm="isqrt", isqrt_iters=5, dtype="float32")
    config.batch_size, config.num_epochs, config.eval_flip = 10, 100, True
    config.optim.update(
        learning_rate=1.2e-3,
        momentum=0.9,
        schedule="step",
        decay_epochs=(100,),
        weight_decay=1e-3,
        classifier_lr_factor=5.0,
        grad_clip_norm=0.0,
        warmup_epochs=0.0,
    )
    return config


# ----------------------------------------------------------------------------------------------
# Validation: every problem of a config at once, each a sentence naming its field.


def eval_batch_size(config: config_dict.ConfigDict) -> int:
    """The global eval batch (config.eval_batch_size, or batch_size when 0)."""
    return config.eval_batch_size or config.batch_size


def _run_problems(c, num_devices: int) -> list[str]:
    problems = []
    for name in ("batch_size", "log_every_steps", "keep_checkpoints"):
        problems += checks.integer_at_least(name, c[name], 1)
    for name in (
        "eval_batch_size",
        "eval_every_epochs",
        "checkpoint_every_steps",
        "max_nonfinite_steps",
        "spectrum_every_steps",
        "step_timeout_s",
    ):
        problems += checks.integer_at_least(name, c[name], 0)
    if not (c.num_train_steps == -1 or c.num_train_steps >= 1):
        problems.append(f"num_train_steps must be -1 (train num_epochs) or at least 1, got {c.num_train_steps}.")
    if c.num_train_steps == -1 and not c.num_epochs > 0:
        problems.append(f"num_epochs must be positive when num_train_steps is -1, got {c.num_epochs}.")
    for name, size in (("batch_size", c.batch_size), ("eval_batch_size", eval_batch_size(c))):
        if isinstance(size, int) and size >= 1 and size % num_devices:
            problems.append(
                f"{name}={size} is not divisible by the {num_devices} devices; use a multiple of {num_devices}."
            )
    return problems


def _model_problems(m) -> list[str]:
    problems = models.model_problems(
        m.arch,
        head=m.head,
        dtype=m.dtype,
        last_stride=m.last_stride,
        dropout_rate=m.dropout_rate,
        drop_connect_rate=m.drop_connect_rate,
    )
    if m.pretrained and not os.path.isfile(m.pretrained):
        problems.append(f"pretrained={m.pretrained!r} is not a file; give a weights file, or '' for random init.")
    return [f"model.{p}" for p in problems]


def _gcp_problems(g) -> list[str]:
    return [f"gcp.{p}" for p in pooling.head_problems(dict(g))]


def _optim_problems(o) -> list[str]:
    problems = [] if o.schedule in optim.SCHEDULES else [checks.not_one_of("schedule", o.schedule, optim.SCHEDULES)]
    for name, ok, rule in (
        ("learning_rate", o.learning_rate > 0, "must be positive"),
        ("momentum", 0 <= o.momentum < 1, "must lie in [0, 1)"),
        ("classifier_lr_factor", o.classifier_lr_factor > 0, "must be positive"),
        ("weight_decay", o.weight_decay >= 0, "must be 0 or more"),
        ("grad_clip_norm", o.grad_clip_norm >= 0, "must be 0 (off) or more"),
        ("decay_factor", 0 < o.decay_factor <= 1, "must lie in (0, 1]"),
        ("warmup_epochs", o.warmup_epochs >= 0, "must be 0 or more"),
    ):
        if not ok:
            problems.append(f"{name} {rule}, got {o[name]!r}.")
    epochs = list(o.decay_epochs)
    if not (all(isinstance(e, numbers.Real) and e >= 0 for e in epochs) and epochs == sorted(epochs)):
        problems.append(f"decay_epochs must be increasing epoch numbers, got {tuple(epochs)}.")
    return [f"optim.{p}" for p in problems]


def data_problems(d) -> list[str]:
    """Every problem of the `data` fields (a full data ConfigDict), named `data.<field>`."""
    problems = []
    if d.on_corrupt not in ON_CORRUPT:
        problems.append(checks.not_one_of("on_corrupt", d.on_corrupt, ON_CORRUPT))
    if d.resize_mode not in RESIZE_MODES:
        problems.append(checks.not_one_of("resize_mode", d.resize_mode, RESIZE_MODES))
    if not 0 < d.image_size <= d.resize_size:
        problems.append(
            f"image_size={d.image_size} must be positive and at most resize_size={d.resize_size}, the size "
            "the crop is taken from."
        )
    problems += checks.integer_at_least("shuffle_buffer", d.shuffle_buffer, 1)
    for key, value in d.synthetic.items():
        problems += checks.integer_at_least(f"synthetic.{key}", value, 1)
    return [f"data.{p}" for p in problems]


def validate(config: config_dict.ConfigDict, *, num_devices: int | None = None) -> None:
    """Raise ConfigError listing every impossible value of `config` (unknown fields were refused on load)."""
    if num_devices is None:
        import jax

        num_devices = jax.device_count()
    _raise(value_problems(config, num_devices=num_devices))


def value_problems(config: config_dict.ConfigDict, *, num_devices: int) -> list[str]:
    """Every impossible value of `config`, one sentence each, named `config.<field>`."""
    found = (
        _run_problems(config, num_devices)
        + _model_problems(config.model)
        + _gcp_problems(config.gcp)
        + _optim_problems(config.optim)
        + data_problems(config.data)
    )
    return ["config." + p for p in found]


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError(describe(problems))


def describe(problems: list[str]) -> str:
    """The message of a ConfigError: one problem as its sentence, several as a count and one per line."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems)


def resolve_data(cfg: Mapping[str, Any]) -> config_dict.ConfigDict:
    """`cfg` (config.data, or any partial mapping of its fields) over the defaults, validated."""
    out, problems = data_config(), []
    _merge(out, cfg, "data", problems)
    if not problems:
        problems = data_problems(out)
    _raise(problems)
    return out


def _merge(target: config_dict.ConfigDict, source: Mapping[str, Any], prefix: str, problems: list[str]) -> None:
    """Copies `source` into `target` key by key; unknown keys become problems naming the closest field."""
    for key, value in source.items():
        if key not in target:
            problems += checks.unknown_fields([key], list(target.keys()), prefix=f"{prefix}.")
        elif isinstance(target[key], config_dict.ConfigDict):
            _merge(target[key], value, f"{prefix}.{key}", problems)
        else:
            target[key] = value


# ----------------------------------------------------------------------------------------------
# Command-line overrides (`--config.<field>=<value>`), worded like validate()'s problems.

_KINDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string", tuple: "a tuple"}


def unknown_overrides(config: config_dict.ConfigDict, fields: Iterable[str]) -> dict[str, str]:
    """{field: problem} for each dotted field name (`optim.learning_rate`) that `config` lacks, with the closest name."""
    problems = {}
    for field in fields:
        node, path = config, "config."
        for part in field.split("."):
            if not isinstance(node, config_dict.ConfigDict):
                problems[field] = f"config.{field} is not a known field: {path[:-1]} is a value, not a group of fields."
                break
            if part not in node:
                problems[field] = checks.unknown_fields([part], list(node.keys()), prefix=path)[0]
                break
            node, path = node[part], f"{path}{part}."
    return problems


def field_value(config: config_dict.ConfigDict, field: str):
    """The value at a dotted field name ("" is the config itself)."""
    return functools.reduce(lambda node, key: node[key], field.split(".") if field else (), config)


def field_type(config: config_dict.ConfigDict, field: str) -> type:
    """The type of a (known) dotted field, as ml_collections reads its overrides (a placeholder's declared type)."""
    group, _, name = field.rpartition(".")
    return field_value(config, group).get_type(name)


def unreadable_override(config: config_dict.ConfigDict, field: str, value: str) -> str:
    """The problem of `--config.<field>=<value>` when the field's type cannot read `value`."""
    kind, current = field_type(config, field), field_value(config, field)
    if issubclass(kind, config_dict.ConfigDict):
        first = next(iter(current))
        return f"config.{field} is a group of fields, not a value; set them one by one: --config.{field}.{first}=…"
    example = "" if current is None or kind is bool else f", e.g. --config.{field}={shlex.quote(str(current))}"
    return f"config.{field}={value!r} is not {_KINDS.get(kind, f'a {kind.__name__}')}{example}."
