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
            <name>.safetensors   optional named tensor sets (e.g. finetuning's replay buffer)

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
                    generators: Optional[Mapping[str, torch.Generator]] = None, keep: Optional[int] = None,
                    state_tensors: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None) -> Path:
    """Write ``<ckpt_root>/<step>/`` atomically; optionally keep only the newest ``keep`` checkpoints.

    ``state_tensors`` ``{name: {key: tensor}}`` go to ``training_state/<name>.safetensors``
    (read back with :func:`load_state_tensors`)."""
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
        for name, tens in (state_tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tens.items()} or {"_empty": torch.zeros(0)},
                      str(ts / f"{name}.safetensors"))
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
    """Accept a checkpoint folder, a checkpoints/ folder or a run directory; return the checkpoint folder.

    The folder is checked to be complete and readable (:func:`check_checkpoint`), so a torn or foreign
    checkpoint is one OffrlError line before anything starts.
    """
    p = Path(path)
    if not p.exists():
        raise OffrlError(f"checkpoint not found: {p}")
    if (p / "model.safetensors").exists():
        return check_checkpoint(p)
    for root in (p, p / "checkpoints"):
        last = latest_checkpoint(root)
        if last is not None:
            return check_checkpoint(last)
    raise OffrlError(f"no checkpoint in {p} (expected model.safetensors or checkpoints/<step>/)")


def checkpoint_json(ckpt: str | Path, name: str) -> dict:
    """A JSON file of a checkpoint folder (``config.json``, ``training_state/state.json``) as a mapping;
    a missing or unreadable file is an OffrlError naming it."""
    f = Path(ckpt) / name
    try:
        data = json.loads(f.read_text())
    except FileNotFoundError:
        raise OffrlError(f"incomplete checkpoint {ckpt}: no {name}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OffrlError(f"corrupt checkpoint {ckpt}: {name} is not readable JSON "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(data, dict):
        raise OffrlError(f"corrupt checkpoint {ckpt}: {name} holds a {type(data).__name__}, not a mapping")
    return data


def check_checkpoint(ckpt: str | Path) -> Path:
    """Raise OffrlError unless ``ckpt`` is a complete, readable checkpoint folder: the safetensors headers
    parse and cover their files (a truncated or overwritten file fails here), config.json and
    training_state/state.json are JSON mappings. Cheap: no tensor is read."""
    from safetensors import safe_open

    p = Path(ckpt)
    for name, required in (("model.safetensors", True), ("normalizer.safetensors", False)):
        f = p / name
        if not f.is_file():
            if required:
                raise OffrlError(f"incomplete checkpoint {p}: no {name}")
            continue
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except Exception as e:  # safetensors raises several types on truncated or foreign files
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise OffrlError(f"corrupt checkpoint {p}: {name}: {why}") from None
    checkpoint_json(p, "config.json")
    checkpoint_json(p, "training_state/state.json")
    return p


def load_checkpoint(path: str | Path, modules: Mapping[str, nn.Module], *, parts: Optional[Iterable[str]] = None,
                    optimizers: Optional[Mapping[str, torch.optim.Optimizer]] = None,
                    generators: Optional[Mapping[str, torch.Generator]] = None, restore_rng: bool = True,
                    keep_lr: bool = False) -> dict:
    """Load selected ``parts`` (default: every module given) into ``modules``; returns training state.

    Optimizers and RNG states are restored only when given/asked; ``parts=("actor",)`` loads the actor
    alone (e.g. to start finetuning from a BC policy with fresh critics). ``keep_lr``: the optimizers keep
    the learning rates they were built with (the run's config) instead of the checkpoint's, unless a
    learning-rate schedule is among ``optimizers`` (its state decides). A resume with an unchanged config is
    unaffected; a resume with a changed rate (Population Based Training) trains with the new one.
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
    state = checkpoint_json(p, "training_state/state.json")
    if optimizers:
        saved = torch.load(p / "training_state" / "optimizers.pt", weights_only=False)
        scheduled = any(not isinstance(o, torch.optim.Optimizer) for o in optimizers.values())
        for k, o in optimizers.items():
            if k in saved:
                lrs = [g["lr"] for g in o.param_groups] if isinstance(o, torch.optim.Optimizer) else None
                o.load_state_dict(saved[k])
                if keep_lr and lrs is not None and not scheduled:
                    for g, lr in zip(o.param_groups, lrs):
                        g["lr"] = lr
    if restore_rng:
        set_rng_state(torch.load(p / "training_state" / "rng.pt", weights_only=False), generators)
    state["path"] = str(p)
    state["config"] = checkpoint_json(p, "config.json")
    return state


def load_state_tensors(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The tensor set ``name`` saved with ``save_checkpoint(..., state_tensors=...)``."""
    p = resolve_checkpoint(path) / "training_state" / f"{name}.safetensors"
    if not p.exists():
        raise OffrlError(f"checkpoint {p.parent.parent} has no saved '{name}' state")
    try:
        out = load_file(str(p))
    except Exception as e:
        raise OffrlError(f"corrupt checkpoint file {p}: {e}") from None
    out.pop("_empty", None)
    return out
