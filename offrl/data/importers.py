"""Importers from the formats researchers already have, into offrl's (ManiSkill's) trajectory format.

**Pickled dict of arrays** (:func:`import_pickle`): ``states (N, d)``, ``actions (N, a)``, ``next_states (N, d)``,
optionally ``rewards (N,)``, ``images (N, H, W, C)``, ``success (N,)``, ``terminals``/``terminated (N,)``,
``timeouts``/``truncated (N,)``. Episode boundaries come from, in this order: ``episode_ids (N,)``,
``episode_lengths (E,)``, ``dones (N,)`` (or ``terminals | timeouts``), and otherwise are inferred where
``next_states[i] != states[i + 1]``. An episode's observations are its ``states`` followed by the
``next_states`` of its last step.

**One NPZ file per trajectory** (:func:`import_npz`): ``action`` or ``actions (T, a)`` plus observation
fields such as ``ee_pose (T, 7)``, ``obj_pose (T, 7)``, ``images``, ``wrist_images (T, H, W, C)``. Vector
fields (1-D or 2-D numeric arrays) are concatenated, in ``obs_keys`` order (default: alphabetical), into
``obs``, and ``obs_layout`` records ``[name, size]`` for each; image fields (4-D arrays) are stored as
``images/<name>``. With ``T`` observation rows the final action has no following observation and is
dropped (``T - 1`` transitions); with ``T + 1`` rows all actions are kept. Optional ``reward(s)``,
``success``, ``terminated``, ``truncated`` per-step arrays are used when present.

Without termination flags, the last step of each episode is marked truncated (so value learning
bootstraps there rather than treating it as a terminal state). Unknown keys are reported, not used.
"""

from __future__ import annotations

import glob
import pickle
from pathlib import Path
from typing import Any, Optional

import numpy as np

from offrl.data.dataset import OfflineDataset
from offrl.data.format import Episode
from offrl.errors import OffrlError

_PICKLE_KEYS = {"states", "actions", "next_states", "rewards", "images", "success", "terminals", "terminated",
                "timeouts", "truncated", "dones", "episode_ids", "episode_lengths"}
_NPZ_RESERVED = {"action", "actions", "reward", "rewards", "terminated", "terminals", "truncated", "timeouts",
                 "done", "dones", "success"}


def _meta(env_id: str, control_mode: str, obs_mode: str, reward_mode: Optional[str], max_episode_steps: Optional[int],
          layout: list, kind: str, src: Any, notes: list) -> dict:
    env_kwargs = {"obs_mode": obs_mode, "control_mode": control_mode}
    if reward_mode:
        env_kwargs["reward_mode"] = reward_mode
    return {
        "env_info": {"env_id": env_id, "env_kwargs": env_kwargs, "max_episode_steps": max_episode_steps},
        "source_type": f"offrl-import-{kind}",
        "source_desc": f"imported from {src}",
        "offrl": {"obs_layout": layout, "reward_mode": reward_mode, "import": {"format": kind, "source": str(src)},
                  "import_notes": notes},
    }


def _layout_like(reference: Optional[str | Path], default: list, dim: int, src: Any) -> list:
    """The observation layout of a reference dataset (checked against ``dim``), or ``default``."""
    if reference is None:
        return default
    ref = OfflineDataset.load(reference)
    layout = ref.obs_layout or [["obs", ref.obs_dim]]
    if ref.obs_dim != dim:
        raise OffrlError(f"{src}: observations have {dim} columns but {reference} has {ref.obs_dim}")
    return layout


def _finite(src: Any, name: str, a: np.ndarray, what: str = "row") -> None:
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        i = int(np.argwhere(~np.isfinite(a))[0][0])
        raise OffrlError(f"{src}: {name} contains NaN/Inf (first at {what} {i})")


# ------------------------------------------------------------------------------------------- pickle

def _boundaries(d: dict, n: int, src: Any) -> tuple[np.ndarray, str]:
    """Episode end indices (exclusive) and how they were found."""
    if "episode_ids" in d:
        ids = np.asarray(d["episode_ids"]).reshape(-1)
        change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
        return np.append(change, n), "episode_ids"
    if "episode_lengths" in d:
        lens = np.asarray(d["episode_lengths"], dtype=np.int64).reshape(-1)
        if lens.sum() != n or (lens < 1).any():
            raise OffrlError(f"{src}: episode_lengths sum to {int(lens.sum())} but there are {n} transitions")
        return np.cumsum(lens), "episode_lengths"
    ends = None
    if "dones" in d:
        ends = np.asarray(d["dones"], bool).reshape(-1)
    elif "terminals" in d or "timeouts" in d:
        ends = np.zeros(n, bool)
        for k in ("terminals", "timeouts"):
            if k in d:
                ends |= np.asarray(d[k], bool).reshape(-1)
    if ends is not None:
        idx = np.flatnonzero(ends) + 1
        if not len(idx) or idx[-1] != n:
            idx = np.append(idx, n)
        return idx, "dones/terminals/timeouts"
    states, nxt = d["states"], d["next_states"]
    gap = np.abs(nxt[:-1] - states[1:]).max(axis=1) > 1e-6 if n > 1 else np.zeros(0, bool)
    return np.append(np.flatnonzero(gap) + 1, n), "inferred from next_states != following states"


def import_pickle(src: str | Path, env_id: str, control_mode: str, obs_mode: str = "state",
                  reward_mode: Optional[str] = None, max_episode_steps: Optional[int] = None,
                  obs_layout_like: Optional[str | Path] = None) -> OfflineDataset:
    """Import a pickled dict of transition arrays (see the module docstring). Only unpickle files you trust."""
    src = Path(src)
    if not src.exists():
        raise OffrlError(f"file not found: {src}")
    try:
        with open(src, "rb") as f:
            d = pickle.load(f)
    except Exception as e:  # unpickling can raise almost anything on a bad file
        raise OffrlError(f"{src}: not a readable pickle ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(d, dict):
        raise OffrlError(f"{src}: expected a pickled dict of arrays, got {type(d).__name__}")
    missing = [k for k in ("states", "actions", "next_states") if k not in d]
    if missing:
        raise OffrlError(f"{src}: missing {', '.join(missing)} (needs states, actions, next_states)")
    d = {k: np.asarray(v) for k, v in d.items()}
    states, actions, nxt = d["states"], d["actions"], d["next_states"]
    if states.ndim != 2 or actions.ndim != 2:
        raise OffrlError(f"{src}: states must be (N, d) and actions (N, a), got {states.shape} and {actions.shape}")
    n = states.shape[0]
    for k in ("actions", "next_states", "rewards", "images", "success", "terminals", "terminated", "timeouts",
              "truncated", "dones", "episode_ids"):
        if k in d and d[k].shape[:1] != (n,):
            raise OffrlError(f"{src}: {k} has {d[k].shape[0] if d[k].ndim else 0} rows but states has {n}")
    if nxt.shape != states.shape:
        raise OffrlError(f"{src}: next_states has shape {nxt.shape} but states has {states.shape}")
    for k in ("states", "actions", "next_states", "rewards"):
        if k in d:
            _finite(src, k, d[k].astype(np.float64) if d[k].dtype.kind != "f" else d[k])
    ends, how = _boundaries(d, n, src)
    notes = [f"episode boundaries: {how}"]
    unknown = sorted(set(d) - _PICKLE_KEYS)
    if unknown:
        notes.append(f"ignored keys: {', '.join(unknown)}")
    term = d.get("terminals", d.get("terminated"))
    trunc = d.get("timeouts", d.get("truncated"))
    if term is None:
        notes.append("no terminals: the last step of each episode is marked truncated")
    episodes = []
    start = 0
    for end in ends:
        sl = slice(start, int(end))
        T = int(end) - start
        te = np.asarray(term[sl], bool).reshape(T) if term is not None else np.zeros(T, bool)
        tr = np.asarray(trunc[sl], bool).reshape(T) if trunc is not None else np.zeros(T, bool)
        if term is None:
            tr[-1] = True
        rewards = {"rewards": d["rewards"][sl].astype(np.float32).reshape(T)} if "rewards" in d else {}
        extras = {"images/images": d["images"][sl]} if "images" in d else {}
        ep = Episode(obs=np.concatenate([states[sl], nxt[int(end) - 1 : int(end)]]).astype(np.float32),
                     actions=actions[sl].astype(np.float32), terminated=te, truncated=tr,
                     success=np.asarray(d["success"][sl], bool).reshape(T) if "success" in d else None,
                     rewards=rewards, extras=extras,
                     info={"control_mode": control_mode, "offrl_source": f"{src.name}[{start}:{int(end)}]"})
        episodes.append(ep)
        start = int(end)
    layout = _layout_like(obs_layout_like, [["states", int(states.shape[1])]], states.shape[1], src)
    meta = _meta(env_id, control_mode, obs_mode, reward_mode, max_episode_steps, layout, "pickle", src, notes)
    return OfflineDataset(episodes, meta)


# ---------------------------------------------------------------------------------------------- npz

def npz_files(src: str | Path) -> list[Path]:
    """The NPZ files named by ``src``: a folder (every ``*.npz`` in it, sorted), a file, or a glob pattern."""
    p = Path(src)
    if p.is_dir():
        files = sorted(p.glob("*.npz"))
    elif p.exists():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(str(src)))
    if not files:
        raise OffrlError(f"no .npz trajectory files at {src}")
    return files


def _npz_episode(path: Path, obs_keys: Optional[list[str]], control_mode: str) -> tuple[Episode, list, list]:
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except Exception as e:
        raise OffrlError(f"{path}: not a readable .npz file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    akey = "action" if "action" in d else "actions" if "actions" in d else None
    if akey is None:
        raise OffrlError(f"{path}: has no 'action' array (keys: {', '.join(sorted(d)) or 'none'})")
    actions = d[akey]
    if actions.ndim != 2 or actions.shape[0] < 1:
        raise OffrlError(f"{path}: action must be (T, a) with T >= 1, got {actions.shape}")
    T = actions.shape[0]
    candidates = {k: v for k, v in d.items() if k not in _NPZ_RESERVED and v.dtype.kind in "fiub" and v.ndim >= 1}
    images = {k: v for k, v in candidates.items() if v.ndim == 4}
    vectors = {k: (v[:, None] if v.ndim == 1 else v) for k, v in candidates.items() if v.ndim in (1, 2)}
    ignored = sorted(set(d) - _NPZ_RESERVED - set(images) - set(vectors) - {akey})
    keys = obs_keys if obs_keys else sorted(vectors)
    for k in keys:
        if k not in vectors:
            raise OffrlError(f"{path}: observation field '{k}' is missing or not a (T, k) array "
                             f"(vector fields: {', '.join(sorted(vectors)) or 'none'})")
    if not keys:
        raise OffrlError(f"{path}: no observation fields besides the action (keys: {', '.join(sorted(d))})")
    rows = {k: vectors[k].shape[0] for k in keys}
    if set(rows.values()) - {T, T + 1} or len(set(rows.values())) != 1:
        raise OffrlError(f"{path}: observation fields must all have T={T} or T+1={T + 1} rows, got {rows}")
    obs = np.concatenate([vectors[k].astype(np.float32) for k in keys], axis=1)
    n = T if obs.shape[0] == T + 1 else T - 1  # transitions kept
    if n < 1:
        raise OffrlError(f"{path}: a single observation row leaves no transition")
    _finite(path, "observations", obs)
    _finite(path, akey, actions.astype(np.float32))

    def per_step(*names: str) -> Optional[np.ndarray]:
        for k in names:
            if k in d:
                v = np.asarray(d[k]).reshape(-1)
                if v.shape[0] == 1 and k == "success":
                    out = np.zeros(n, bool)
                    out[-1] = bool(v[0])
                    return out
                if v.shape[0] < n:
                    raise OffrlError(f"{path}: {k} has {v.shape[0]} rows, needs at least {n}")
                return v[:n]
        return None

    te, tr = per_step("terminated", "terminals"), per_step("truncated", "timeouts")
    te = np.zeros(n, bool) if te is None else te.astype(bool)
    if tr is None:
        tr = np.zeros(n, bool)
        tr[-1] = not te[-1]
    r = per_step("reward", "rewards")
    if r is not None:
        _finite(path, "reward", r.astype(np.float32))
    s = per_step("success")
    extras = {f"images/{k}": v[: n + 1] for k, v in images.items()}
    for k, v in extras.items():
        if v.shape[0] < n:
            raise OffrlError(f"{path}: {k.split('/', 1)[1]} has {v.shape[0]} rows, needs at least {n}")
    ep = Episode(obs=obs[: n + 1], actions=actions[:n].astype(np.float32), terminated=te, truncated=tr.astype(bool),
                 success=None if s is None else s.astype(bool),
                 rewards={} if r is None else {"rewards": r.astype(np.float32)}, extras=extras,
                 info={"control_mode": control_mode, "offrl_source": path.name})
    layout = [[k, int(vectors[k].shape[1])] for k in keys]
    return ep, layout, ignored


def import_npz(src: str | Path, env_id: str, control_mode: str, obs_mode: str = "state",
               reward_mode: Optional[str] = None, max_episode_steps: Optional[int] = None,
               obs_keys: Optional[list[str]] = None, obs_layout_like: Optional[str | Path] = None,
               progress: bool = False) -> OfflineDataset:
    """Import one NPZ file per trajectory (see the module docstring)."""
    files = npz_files(src)
    it = files
    if progress:
        from tqdm import tqdm

        it = tqdm(files, desc="import npz", unit="file", leave=False, disable=None)
    episodes, layout0, ignored_all = [], None, set()
    for p in it:
        ep, layout, ignored = _npz_episode(p, obs_keys, control_mode)
        if layout0 is None:
            layout0 = layout
        elif layout != layout0:
            raise OffrlError(f"{p}: observation fields {layout} differ from {files[0].name}'s {layout0}")
        if episodes:
            e0 = episodes[0]
            if ep.actions.shape[1] != e0.actions.shape[1]:
                raise OffrlError(f"{p}: action size {ep.actions.shape[1]} differs from {files[0].name}'s "
                                 f"{e0.actions.shape[1]}")
            for what, mine, first in (("reward", bool(ep.rewards), bool(e0.rewards)),
                                      ("success", ep.success is not None, e0.success is not None),
                                      ("image", sorted(ep.extras), sorted(e0.extras))):
                if mine != first:
                    raise OffrlError(f"{p}: has different {what} fields than {files[0].name}")
        episodes.append(ep)
        ignored_all.update(ignored)
    notes = [f"observation fields: {', '.join(f'{n}({s})' for n, s in layout0)}"]
    if ignored_all:
        notes.append(f"ignored keys: {', '.join(sorted(ignored_all))}")
    dim = sum(s for _, s in layout0)
    layout = _layout_like(obs_layout_like, layout0, dim, src)
    meta = _meta(env_id, control_mode, obs_mode, reward_mode, max_episode_steps, layout, "npz", src, notes)
    return OfflineDataset(episodes, meta)
