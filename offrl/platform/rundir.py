"""Run directories: ``runs/<experiment>/<trial>/`` with config.yaml, meta.json, metrics.csv, TensorBoard
events and ``checkpoints/<step>/``."""

from __future__ import annotations

import json
import os
import platform as _stdlib_platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from offrl.config import save_config, to_dict
from offrl.errors import OffrlError

_PACKAGES = ("offrl", "torch", "ray", "mani_skill", "sapien", "numpy", "gymnasium", "h5py", "pandas")


def git_info(cwd: str | Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the source tree offrl runs from (None outside a git checkout)."""
    cwd = str(cwd or Path(__file__).resolve().parents[2])
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty if commit else None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def meta_dict(command: str | None = None) -> dict[str, Any]:
    return {
        "git": git_info(),
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
        "os": _stdlib_platform.platform(),
        "command": command if command is not None else " ".join(sys.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def trial_name() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"


def create_run_dir(cfg: Any, *, exist_ok: bool = False, command: str | None = None) -> Path:
    """Make ``<run.root>/<run.experiment>/<run.trial>/`` and write config.yaml and meta.json into it."""
    trial = cfg.run.trial or trial_name()
    path = Path(cfg.run.root) / cfg.run.experiment / trial
    if path.exists() and any(path.iterdir()) and not exist_ok:
        raise OffrlError(f"run directory {path} exists already; choose another run.trial or remove it")
    path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path / "config.yaml")
    (path / "meta.json").write_text(json.dumps(meta_dict(command), indent=2))
    return path


def update_resumed_config(cfg: Any, run_dir: str | Path, log: Any = print) -> list[str]:
    """A resumed run's config.yaml becomes the config it continues with, so that it says what ran (e.g. a
    run continued with more ``finetune.iterations``); returns the changed keys, each logged with its
    old and new value."""
    import yaml

    from offrl.stats.load import flatten_config

    path = Path(run_dir) / "config.yaml"
    try:
        old = flatten_config(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError):
        old = {}
    new = flatten_config(to_dict(cfg))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        save_config(cfg, path)
        log("[offrl] --resume with changed keys (config.yaml updated): "
            + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
    return changed


def discard_run_dir(run_dir: str | Path) -> None:
    """Remove a run directory that holds nothing worth keeping (a run that failed before its first
    checkpoint), and its experiment folder when that is left empty: a failed run leaves no trace."""
    import shutil

    run_dir = Path(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        run_dir.parent.rmdir()  # only succeeds when empty: other trials of the experiment stay
    except OSError:
        pass
