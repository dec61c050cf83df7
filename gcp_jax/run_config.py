"""The config a run keeps in its workdir: saved on the first start, changed on resume only
explicitly (RESUME_MAY_CHANGE), and read back for an evaluation (EVAL_MAY_CHANGE) or an analysis.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from ml_collections import ConfigDict

from gcp_jax import config as config_lib
from gcp_jax import metrics as metrics_lib

CONFIG_FILE = "config.json"

# Fields a resumed run may change freely: run length and logging/eval/checkpoint cadence, where
# the data live, and switches of this program. Any other change needs config.allow_config_change.
RESUME_MAY_CHANGE = (
    "num_epochs",
    "num_train_steps",
    "log_every_steps",
    "eval_every_epochs",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "spectrum_every_steps",
    "max_nonfinite_steps",
    "step_timeout_s",
    "eval_batch_size",
    "eval_flip",
    "eval_only",
    "allow_config_change",
    "compile_cache_dir",
    "data.data_dir",
    "data.manual_dir",
    "data.cache",
)
# Command-line overrides that apply to an evaluation of a saved run (eval_only); others are ignored.
EVAL_MAY_CHANGE = (
    "eval_only",
    "compile_cache_dir",
    "eval_batch_size",
    "eval_flip",
    "data.eval_split",
    "data.data_dir",
    "data.manual_dir",
    "data.cache",
    "data.on_corrupt",
)
_CONFIG_FILE_RE = re.compile(r"config(?:\.(\d+))?\.json")


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """{"optim.learning_rate": 0.05, ...}: every leaf field of a config (lists as tuples)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def config_changes(old: ConfigDict, new: ConfigDict) -> dict[str, tuple[Any, Any]]:
    """{field: (old value, new value)} of the fields whose values differ."""
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def saved_config_path(workdir: str) -> str | None:
    """The file of the config in effect in workdir: the newest config.<step>.json, else config.json; None."""
    if not os.path.isdir(workdir):
        return None
    found = []
    for name in os.listdir(workdir):
        match = _CONFIG_FILE_RE.fullmatch(name)
        if match:
            found.append((-1 if match[1] is None else int(match[1]), os.path.join(workdir, name)))
    return max(found)[1] if found else None


def load_config(workdir: str) -> ConfigDict:
    """The config a run in workdir uses now (its newest saved config), over this version's defaults."""
    path = saved_config_path(workdir)
    if path is None:
        raise FileNotFoundError(
            f"{os.path.join(workdir, CONFIG_FILE)} not found: point --workdir at a directory that train.py wrote."
        )
    try:
        with open(path, encoding="utf-8") as f:
            saved = _flat(json.load(f))
    except ValueError as e:
        raise config_lib.ConfigError(
            f"{path}, the run's saved config, cannot be read ({e}); repair it, or give a new --workdir."
        ) from e
    config, unknown = config_lib.get_config(), []
    for name, value in saved.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, ConfigDict) else None
        if not isinstance(node, ConfigDict) or leaf not in node:
            unknown.append(name)
        else:
            node[leaf] = tuple(value) if isinstance(node[leaf], tuple) and value is not None else value
    if unknown:
        metrics_lib.LOGGER.warning(f"{path}: ignored fields this version does not know: {', '.join(unknown)}.")
    return config


def load_config_with(workdir: str, overrides: Mapping[str, Any], *, eval_only: bool = False) -> ConfigDict:
    """The saved config of the run in workdir with command-line `overrides` ({"data.eval_split": ...}) on top.

    eval_only: only the overrides of EVAL_MAY_CHANGE apply; the others are named and ignored.
    """
    metrics_lib.setup_logging()
    config = load_config(workdir)
    ignored = [k for k in overrides if eval_only and k not in EVAL_MAY_CHANGE]
    config.update_from_flattened_dict({k: v for k, v in overrides.items() if k not in ignored})
    if eval_only:
        config.eval_only = True
        if ignored:
            metrics_lib.LOGGER.warning(
                f"eval_only evaluates with the run's saved config ({saved_config_path(workdir)}); ignored: "
                + ", ".join(f"--config.{k}" for k in ignored)
            )
    return config


def check_config_change(config: ConfigDict, workdir: str) -> None:
    """Refuse (ConfigError), before any file is touched, a config that differs from the run's saved one
    in more than RESUME_MAY_CHANGE, unless config.allow_config_change."""
    if saved_config_path(workdir) is None:
        return
    changes = config_changes(load_config(workdir), config)
    refused = {k: v for k, v in changes.items() if k not in RESUME_MAY_CHANGE}
    if refused and not config.allow_config_change:
        shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in list(refused.items())[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise config_lib.ConfigError(
            f"The config differs from the run's saved config ({saved_config_path(workdir)}) in {shown}{more}; "
            "run with the saved config, give a new --workdir, or pass --config.allow_config_change=True to "
            "continue this run with the new values."
        )


def save_config(config: ConfigDict, workdir: str, step: int = 0) -> str | None:
    """Keep `config` in workdir (process 0): config.json for a new run; for a resumed run whose config
    differs from the one in effect, config.<step>.json. Nothing is overwritten: a file of the same
    name with other contents is renamed `<name>.replaced-<time>` first. Returns the path written, if any."""
    if not metrics_lib.is_writer():
        return None
    os.makedirs(workdir, exist_ok=True)
    if saved_config_path(workdir) is None:
        path = os.path.join(workdir, CONFIG_FILE)
    elif config_changes(load_config(workdir), config):
        path = os.path.join(workdir, f"config.{step}.json")
        if os.path.exists(path):
            os.rename(path, f"{path}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
    else:
        return None
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
    return path
