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

from gcp_jax import checkpoint as ckpt_lib
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
    files = _config_files(workdir)
    return files[-1] if files else None


def _config_files(workdir: str) -> list[str]:
    """workdir's config files, oldest first: config.json, then config.<step>.json by step."""
    if not os.path.isdir(workdir):
        return []
    found = []
    for name in os.listdir(workdir):
        match = _CONFIG_FILE_RE.fullmatch(name)
        if match:
            found.append((-1 if match[1] is None else int(match[1]), os.path.join(workdir, name)))
    return [path for _, path in sorted(found)]


# Fields every config of train.py has had: a file without one of them is not a run's config.
_DEFINING_FIELDS = ("batch_size", "model.arch", "data.name", "optim.learning_rate")


def _read_file(path: str) -> dict[str, Any]:
    """The flat fields of a saved config file; ConfigError when it is unreadable or not a run's config."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except ValueError as e:
        raise config_lib.ConfigError(
            f"{path}, the run's saved config, cannot be read ({e}); repair or remove it, or give a new --workdir."
        ) from e
    flat = _flat(saved) if isinstance(saved, Mapping) else {}
    missing = [name for name in _DEFINING_FIELDS if name not in flat]
    if missing:
        raise config_lib.ConfigError(
            f"{path}, the run's saved config, is not a config of train.py (it has no {', '.join(missing)}); "
            "repair or remove it, or give a new --workdir."
        )
    return flat


def _over_defaults(saved: Mapping[str, Any], source: str) -> ConfigDict:
    """This version's default config with the flat fields `saved` (of `source`) set; unknown ones warned about."""
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
        metrics_lib.LOGGER.warning(f"{source}: ignored fields this version does not know: {', '.join(unknown)}.")
    return config


def config_record(config: ConfigDict) -> dict[str, Any]:
    """`config` as the JSON dict a checkpoint keeps (checkpoint.CONFIG_KEY of its meta)."""
    return json.loads(config.to_json_best_effort())


def _checkpoint_config(workdir: str) -> tuple[str, ConfigDict | None] | None:
    """(a description of it, the config) of the newest checkpoint in workdir (config None: a checkpoint
    of a version that did not keep it); None: no checkpoint."""
    newest = ckpt_lib.newest_config(workdir)
    if newest is None:
        return None
    step, record = newest
    source = f"the checkpoint at step {step} in {os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)}"
    return source, None if record is None else _over_defaults(_flat(record), source)


def _refused_changes(old: ConfigDict, new: ConfigDict) -> dict[str, tuple[Any, Any]]:
    """The changes from `old` to `new` a resumed run may not make without allow_config_change."""
    return {k: v for k, v in config_changes(old, new).items() if k not in RESUME_MAY_CHANGE}


def _describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    shown = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in list(changes.items())[:6])
    return shown + (f" and {len(changes) - 6} more" if len(changes) > 6 else "")


def has_saved_config(workdir: str) -> bool:
    """Whether workdir holds a run's config: a config file, or a checkpoint that keeps its config."""
    if saved_config_path(workdir):
        return True
    newest = _checkpoint_config(workdir)
    return newest is not None and newest[1] is not None


def config_source(workdir: str) -> str:
    """Where the config in effect in workdir comes from: its file, or its newest checkpoint."""
    newest = _checkpoint_config(workdir)
    return saved_config_path(workdir) or (newest[0] if newest else os.path.join(workdir, CONFIG_FILE))


def load_config(workdir: str) -> ConfigDict:
    """The config a run in workdir uses now, over this version's defaults: its newest saved config file,
    else (the file was lost) the config kept in its newest checkpoint.

    A file is refused (ConfigError, naming it) when it is not a run's config, or when it matches none
    of the configs of the workdir's files and its newest checkpoint's config differs from it beyond
    RESUME_MAY_CHANGE: it describes another run.
    """
    path, newest = saved_config_path(workdir), _checkpoint_config(workdir)
    if path is None:
        if newest is not None and newest[1] is not None:
            return newest[1]
        raise FileNotFoundError(
            f"{os.path.join(workdir, CONFIG_FILE)} not found: point --workdir at a directory that train.py wrote."
        )
    config = _over_defaults(_read_file(path), path)
    if newest is not None and newest[1] is not None:
        kept = newest[1]
        files = [config] + [_over_defaults(_read_file(p), p) for p in _config_files(workdir) if p != path]
        if all(_refused_changes(kept, file) for file in files):
            raise config_lib.ConfigError(
                f"{path} describes another run than {newest[0]} (file -> checkpoint: "
                f"{_describe(_refused_changes(config, kept))}); remove that file to resume with the checkpoint's "
                "config, or give this run a new --workdir."
            )
    return config


def load_config_with(workdir: str, overrides: Mapping[str, Any], *, eval_only: bool = False) -> ConfigDict:
    """The saved config of the run in workdir with command-line `overrides` ({"data.eval_split": ...}) on top.

    eval_only: only the overrides of EVAL_MAY_CHANGE apply; the others are named and ignored, except
    those that give the saved value (they change nothing).
    """
    metrics_lib.setup_logging()
    config = load_config(workdir)
    saved = _flat(config.to_dict())
    ignored = [
        k
        for k, v in overrides.items()
        if eval_only and k not in EVAL_MAY_CHANGE and saved.get(k) != (tuple(v) if isinstance(v, list) else v)
    ]
    config.update_from_flattened_dict({k: v for k, v in overrides.items() if k not in ignored})
    if eval_only:
        config.eval_only = True
        if ignored:
            metrics_lib.LOGGER.warning(
                f"eval_only evaluates with the run's saved config ({config_source(workdir)}); ignored: "
                + ", ".join(f"--config.{k}" for k in ignored)
            )
    return config


def check_config_change(config: ConfigDict, workdir: str) -> None:
    """Refuse (ConfigError), before any file is touched, a config that differs from the run's saved one
    in more than RESUME_MAY_CHANGE, unless config.allow_config_change.

    The saved config is the file's or, where it was lost, the newest checkpoint's. A workdir with
    checkpoints of an earlier version (without their config) and no config file is refused too: there
    is nothing to compare with.
    """
    if not has_saved_config(workdir):
        newest = _checkpoint_config(workdir)
        if newest is not None and not config.allow_config_change:
            raise config_lib.ConfigError(
                f"{workdir} holds checkpoints but no {CONFIG_FILE}, and {newest[0]} was written by an earlier "
                "version that did not keep its config, so this config cannot be checked against the run's; "
                f"restore {CONFIG_FILE}, or pass --config.allow_config_change=True to resume with this config."
            )
        return
    refused = _refused_changes(load_config(workdir), config)
    if refused and not config.allow_config_change:
        raise config_lib.ConfigError(
            f"The config differs from the run's saved config ({config_source(workdir)}) in {_describe(refused)}; "
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
    if saved_config_path(workdir) is None and has_saved_config(workdir):  # lost: the checkpoint's comes back
        source = config_source(workdir)
        _write(load_config(workdir), os.path.join(workdir, CONFIG_FILE))
        metrics_lib.log(f"{os.path.join(workdir, CONFIG_FILE)} was missing: restored from {source}.")
    if saved_config_path(workdir) is None:
        path = os.path.join(workdir, CONFIG_FILE)
    elif config_changes(load_config(workdir), config):
        path = os.path.join(workdir, f"config.{step}.json")
        if os.path.exists(path):
            os.rename(path, f"{path}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
    else:
        return None
    _write(config, path)
    return path


def _write(config: ConfigDict, path: str) -> None:
    """Write `config` to `path` through a temporary file renamed into place (never a torn file)."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
