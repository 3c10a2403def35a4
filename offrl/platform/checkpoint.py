"""Checkpoints: ``checkpoints/<step>/`` written atomically (temp dir + rename).

Layout::

    checkpoints/<step>/
        model.safetensors        every module's parameters, keys prefixed "<part>." (actor., critic., ...)
        normalizer.safetensors   observation-normalizer statistics, keys "<part>.<buffer>"
        config.json              the resolved experiment config
        training_state/
            optimizers.pt        optimizer state dicts by name
            state.json           step and any extra counters
            rng.pt               python, numpy and torch RNG states (+ named torch Generators)

A kill at any moment leaves either the complete previous checkpoints or a ``.tmp-*`` folder that
readers ignore, never a torn ``<step>/`` folder. Parts load selectively (``parts=("actor",)``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from offrl.errors import OffrlError

NORMALIZER_PREFIX = "normalizer."


def _split_normalizer(module: nn.Module) -> tuple[dict, dict]:
    """State dict of a module split into (regular tensors, normalizer buffers)."""
    reg, norm = {}, {}
    for k, v in module.state_dict().items():
        (norm if k.startswith(NORMALIZER_PREFIX) or f".{NORMALIZER_PREFIX}" in k else reg)[k] = v
    return reg, norm


def rng_state(generators: Optional[Mapping[str, torch.Generator]] = None) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }


def set_rng_state(state: dict, generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for k, g in (generators or {}).items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])


def save_checkpoint(ckpt_root: str | Path, step: int, modules: Mapping[str, nn.Module], *,
                    optimizers: Optional[Mapping[str, torch.optim.Optimizer]] = None,
                    config: Optional[dict] = None, extra_state: Optional[dict] = None,
                    generators: Optional[Mapping[str, torch.Generator]] = None, keep: Optional[int] = None) -> Path:
    """Write ``<ckpt_root>/<step>/`` atomically; optionally keep only the newest ``keep`` checkpoints."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / str(int(step))
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{int(step)}-", dir=root))
    try:
        tensors, norms = {}, {}
        for part, m in modules.items():
            reg, norm = _split_normalizer(m)
            tensors.update({f"{part}.{k}": v.detach().cpu().contiguous() for k, v in reg.items()})
            norms.update({f"{part}.{k}": v.detach().cpu().contiguous() for k, v in norm.items()})
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"parts": ",".join(modules)})
        save_file(norms or {"_empty": torch.zeros(0)}, str(tmp / "normalizer.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config or {}, indent=2))
        ts = tmp / "training_state"
        ts.mkdir()
        torch.save({k: o.state_dict() for k, o in (optimizers or {}).items()}, ts / "optimizers.pt")
        (ts / "state.json").write_text(json.dumps({"step": int(step), **(extra_state or {})}, indent=2))
        torch.save(rng_state(generators), ts / "rng.pt")
        for f in list(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints under ``ckpt_root``, oldest first (temp folders are ignored)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def latest_checkpoint(ckpt_root: str | Path) -> Optional[Path]:
    cks = list_checkpoints(ckpt_root)
    return cks[-1] if cks else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, a checkpoints/ folder or a run directory; return the checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise OffrlError(f"checkpoint not found: {p}")
    if (p / "model.safetensors").exists():
        return p
    for root in (p, p / "checkpoints"):
        last = latest_checkpoint(root)
        if last is not None:
            return last
    raise OffrlError(f"no checkpoint in {p} (expected model.safetensors or checkpoints/<step>/)")


def load_checkpoint(path: str | Path, modules: Mapping[str, nn.Module], *, parts: Optional[Iterable[str]] = None,
                    optimizers: Optional[Mapping[str, torch.optim.Optimizer]] = None,
                    generators: Optional[Mapping[str, torch.Generator]] = None, restore_rng: bool = True) -> dict:
    """Load selected ``parts`` (default: every module given) into ``modules``; returns training state.

    Optimizers and RNG states are restored only when given/asked; ``parts=("actor",)`` loads the actor
    alone (e.g. to start finetuning from a BC policy with fresh critics).
    """
    p = resolve_checkpoint(path)
    try:
        tensors = load_file(str(p / "model.safetensors"))
        norms = load_file(str(p / "normalizer.safetensors")) if (p / "normalizer.safetensors").exists() else {}
    except Exception as e:  # safetensors raises several types on truncated or foreign files
        raise OffrlError(f"corrupt checkpoint {p}: {e}") from None
    tensors.update({k: v for k, v in norms.items() if k != "_empty"})
    available = sorted({k.split(".", 1)[0] for k in tensors})
    wanted = list(parts) if parts is not None else list(modules)
    for part in wanted:
        if part not in modules:
            raise OffrlError(f"cannot load part '{part}': no such module here (have {', '.join(modules)})")
        if part not in available:
            raise OffrlError(f"checkpoint {p} has no part '{part}' (it has {', '.join(available)})")
        sd = {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
        try:
            modules[part].load_state_dict(sd)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise OffrlError(f"checkpoint {p} part '{part}' does not fit the network: {first}") from None
    state = json.loads((p / "training_state" / "state.json").read_text())
    if optimizers:
        saved = torch.load(p / "training_state" / "optimizers.pt", weights_only=False)
        for k, o in optimizers.items():
            if k in saved:
                o.load_state_dict(saved[k])
    if restore_rng:
        set_rng_state(torch.load(p / "training_state" / "rng.pt", weights_only=False), generators)
    state["path"] = str(p)
    state["config"] = json.loads((p / "config.json").read_text())
    return state
