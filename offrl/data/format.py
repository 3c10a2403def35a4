"""ManiSkill's trajectory format: read (with validation) and write (atomically).

One HDF5 file holds a group ``traj_<i>`` per episode and a JSON sidecar of the same name holds the
metadata, exactly as ManiSkill's ``RecordEpisode`` wrapper writes them::

    traj_<i>/obs              [T+1, obs_dim] float32   (or a group of vectors for obs_mode=state_dict)
    traj_<i>/actions          [T, act_dim]   float32
    traj_<i>/terminated       [T] bool
    traj_<i>/truncated        [T] bool
    traj_<i>/success          [T] bool                  (optional in ManiSkill files)
    traj_<i>/rewards          [T] float32               (the env's reward_mode; optional in ManiSkill files)
    traj_<i>/env_states/actors/<name>        [T+1, 13]
    traj_<i>/env_states/articulations/<name> [T+1, 13 + 2 * dof]

    <file>.json: {"env_info": {"env_id", "env_kwargs", "max_episode_steps"},
                  "episodes": [{"episode_id", "episode_seed", "reset_kwargs", "control_mode",
                                "elapsed_steps", "success", ...}], ...}

offrl adds datasets that ManiSkill's tools ignore: ``rewards_<mode>`` (the same steps under the other
reward modes, e.g. ``rewards_sparse``), ``images/<name>`` (imported camera frames) and a top-level
``"offrl"`` JSON entry (observation layout, reward modes, how the data was made). Any other dataset in
a trajectory group is kept verbatim in :attr:`Episode.extras`, so a load/save round trip loses nothing.

Loading validates everything before returning: a missing sidecar or group, a truncated or corrupt
HDF5 file, shape mismatches between obs/actions/rewards/flags/env states, NaN or Inf values. Each
problem raises :class:`offrl.errors.OffrlError` with one line naming the file and the episode.
Writing goes to temporary files renamed on success, and float datasets carry HDF5's Fletcher-32
checksum, so silent corruption of the bytes is detected on read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from offrl.errors import OffrlError

FORMAT_VERSION = 1
REWARD_PREFIX = "rewards_"
REWARD_MODES = ("sparse", "dense", "normalized_dense")
_FLAGS = ("terminated", "truncated", "success")


@dataclass
class Episode:
    """One trajectory, as numpy arrays: ``T`` actions and ``T + 1`` observations / env states."""

    obs: np.ndarray                     #: [T+1, obs_dim] float32; obs[t] is seen before actions[t]
    actions: np.ndarray                 #: [T, act_dim] float32
    terminated: np.ndarray              #: [T] bool, the task ended after actions[t] (success or failure)
    truncated: np.ndarray               #: [T] bool, the time limit ended the episode after actions[t]
    success: Optional[np.ndarray] = None  #: [T] bool, the task is solved after actions[t]
    rewards: dict[str, np.ndarray] = field(default_factory=dict)  #: "rewards", "rewards_sparse", ... -> [T]
    env_states: Optional[dict] = None   #: nested dict of [T+1, ...] arrays (ManiSkill get_state_dict layout)
    extras: dict[str, np.ndarray] = field(default_factory=dict)   #: other datasets by path ("fail", "images/wrist")
    info: dict = field(default_factory=dict)  #: the JSON episode entry (episode_seed, reset_kwargs, ...)

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])

    @property
    def succeeded(self) -> Optional[bool]:
        """Success at the last step (ManiSkill's episode label); None when the data has no success flags."""
        if self.success is not None and self.length:
            return bool(self.success[-1])
        if "success" in self.info:
            return bool(self.info["success"])
        return None


# ------------------------------------------------------------------------------------------- paths

def json_path(h5_path: str | Path) -> Path:
    """The JSON sidecar of an HDF5 trajectory file (``x.h5`` -> ``x.json``)."""
    p = Path(h5_path)
    return p.with_suffix(".json")


def _err(path: Any, msg: str, episode: Optional[str] = None) -> OffrlError:
    where = f"{path}: {episode}: " if episode else f"{path}: "
    return OffrlError(where + " ".join(str(msg).split()))


# ------------------------------------------------------------------------------------------ reading

def read_json(path: Path, h5: Path) -> dict:
    if not path.exists():
        raise _err(h5, f"JSON sidecar {path.name} is missing (ManiSkill trajectory files come in .h5 + .json pairs)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _err(path, f"is not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("episodes"), list):
        raise _err(path, "has no 'episodes' list (not a ManiSkill trajectory sidecar)")
    if not isinstance(data.get("env_info"), dict) or "env_id" not in data["env_info"]:
        raise _err(path, "has no 'env_info' with 'env_id'")
    return data


def _read_tree(node: Any, path: Any, ep: str, prefix: str = "") -> dict:
    """All datasets under an h5py group as a nested dict of numpy arrays (creation order kept)."""
    import h5py

    out: dict = {}
    for key in node.keys():
        name = f"{prefix}{key}"
        try:
            child = node[key]
            out[key] = _read_tree(child, path, ep, name + "/") if isinstance(child, h5py.Group) else child[()]
        except OSError as e:
            raise _err(path, f"cannot read '{name}' (truncated or corrupt data: {str(e).splitlines()[0]})", ep) from None
    return out


def _flatten_obs(obs: Any, path: Any, ep: str) -> tuple[np.ndarray, list]:
    """A flat obs array and its layout ``[[name, size], ...]``; dict observations of vectors are concatenated."""
    if isinstance(obs, np.ndarray):
        if obs.ndim != 2:
            raise _err(path, f"obs must be [T+1, obs_dim], got shape {obs.shape}", ep)
        return obs, [["obs", int(obs.shape[1])]]
    parts, layout = [], []

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                if k in ("sensor_data", "sensor_param"):
                    raise _err(path, f"obs/{name} holds camera data; offrl needs state observations "
                                     "(convert with: python -m mani_skill.trajectory.replay_trajectory "
                                     "--traj-path FILE -o state --save-traj --use-env-states)", ep)
                walk(v, name + "/")
                continue
            v = np.asarray(v)
            if v.ndim == 1:
                v = v[:, None]
            if v.ndim != 2:
                raise _err(path, f"obs/{name} has shape {v.shape}; only vector observations can be flattened", ep)
            parts.append(v.astype(np.float32))
            layout.append([name, int(v.shape[1])])

    walk(obs, "")
    if not parts:
        raise _err(path, "obs group is empty", ep)
    rows = {p.shape[0] for p in parts}
    if len(rows) != 1:
        raise _err(path, f"obs fields have different lengths {sorted(rows)}", ep)
    return np.concatenate(parts, axis=1), layout


def _leaves(d: dict, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _check_finite(path: Any, ep: str, name: str, a: np.ndarray) -> None:
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        kind = "NaN" if np.isnan(a[tuple(bad)]) else "Inf"
        raise _err(path, f"{name} contains {kind} (first at index {tuple(int(i) for i in bad)})", ep)


def _episode_from_tree(tree: dict, info: dict, path: Any, ep: str, declared: list) -> tuple[Episode, list]:
    missing = [k for k in ("obs", "actions", "terminated", "truncated") if k not in tree]
    missing += [k for k in declared if k not in tree and k.split("/")[0] not in tree]
    if missing:
        raise _err(path, f"missing {', '.join(sorted(set(missing)))}", ep)
    if isinstance(tree["actions"], dict):
        raise _err(path, "actions is a group (dict action space); offrl needs flat action vectors", ep)
    obs, layout = _flatten_obs(tree.pop("obs"), path, ep)
    actions = np.asarray(tree.pop("actions"))
    if actions.ndim != 2:
        raise _err(path, f"actions must be [T, act_dim], got shape {actions.shape}", ep)
    T = actions.shape[0]
    if T == 0:
        raise _err(path, "has no steps (0 actions)", ep)
    if obs.shape[0] != T + 1:
        raise _err(path, f"obs has {obs.shape[0]} rows but actions has {T} (ManiSkill layout: obs has T+1 rows)", ep)
    arrays: dict[str, np.ndarray] = {}
    for k in _FLAGS:
        if k in tree:
            v = np.asarray(tree.pop(k))
            if v.shape != (T,):
                raise _err(path, f"{k} has shape {v.shape}, expected ({T},) to match actions", ep)
            arrays[k] = v.astype(bool)
    rewards = {}
    for k in [k for k in tree if k == "rewards" or k.startswith(REWARD_PREFIX)]:
        v = tree.pop(k)
        if isinstance(v, dict) or np.shape(v) != (T,):
            raise _err(path, f"{k} has shape {np.shape(v) if not isinstance(v, dict) else 'group'}, "
                             f"expected ({T},) to match actions", ep)
        rewards[k] = np.asarray(v, dtype=np.float32)
    env_states = tree.pop("env_states", None)
    if env_states is not None:
        if not isinstance(env_states, dict):
            env_states = {"state": env_states}  # ManiSkill 2 stored one flat [T+1, D] array
        for name, v in _leaves(env_states):
            if v.shape[:1] != (T + 1,):
                raise _err(path, f"env_states/{name} has {v.shape[0] if v.ndim else 0} rows, expected {T + 1} "
                                 "(T+1 like obs)", ep)
            _check_finite(path, ep, f"env_states/{name}", v)
    extras = dict(_leaves(tree))
    for name, v in extras.items():
        if v.ndim >= 1 and v.shape[0] not in (T, T + 1):  # per-step data: T (like actions) or T+1 (like obs)
            raise _err(path, f"{name} has {v.shape[0]} rows, expected {T} or {T + 1}", ep)
        _check_finite(path, ep, name, v)
    _check_finite(path, ep, "obs", obs)
    _check_finite(path, ep, "actions", actions)
    for k, v in rewards.items():
        _check_finite(path, ep, k, v)
    steps = info.get("elapsed_steps")
    if steps is not None and int(steps) != T:
        raise _err(path, f"JSON says elapsed_steps={steps} but the trajectory has {T} actions", ep)
    episode = Episode(obs=obs.astype(np.float32, copy=False), actions=actions.astype(np.float32, copy=False),
                      terminated=arrays["terminated"], truncated=arrays["truncated"], success=arrays.get("success"),
                      rewards=rewards, env_states=env_states, extras=extras,
                      info={k: v for k, v in info.items() if k != "episode_id"})
    return episode, layout


def read_trajectories(path: str | Path, progress: bool = False) -> tuple[list[Episode], dict]:
    """Read and validate a ManiSkill trajectory file: (episodes, JSON metadata without ``episodes``)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise OffrlError(f"dataset not found: {path}")
    if path.is_dir():
        raise OffrlError(f"{path} is a folder, not a .h5 trajectory file")
    meta = read_json(json_path(path), path)
    entries = meta.pop("episodes")
    if not entries:
        raise _err(path, "has no episodes")
    declared = list(meta.get("offrl", {}).get("datasets", []))
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise _err(path, f"is not a readable HDF5 file (truncated or corrupt: {str(e).splitlines()[0]})") from None
    episodes: list[Episode] = []
    layout0 = None
    with f:
        try:
            names = set(f.keys())
        except (OSError, RuntimeError) as e:
            raise _err(path, f"is corrupt ({str(e).splitlines()[0]})") from None
        listed = set()
        it = entries
        if progress:
            from tqdm import tqdm

            it = tqdm(entries, desc=f"load {path.name}", unit="ep", leave=False, disable=None)
        for entry in it:
            if not isinstance(entry, dict) or "episode_id" not in entry:
                raise _err(json_path(path), f"episode entry {entry!r:.60} has no episode_id")
            ep = f"traj_{entry['episode_id']}"
            listed.add(ep)
            if ep not in names:
                raise _err(path, f"listed in {json_path(path).name} but missing from the HDF5 file", ep)
            try:
                grp = f[ep]
            except (OSError, KeyError) as e:
                raise _err(path, f"cannot open the group ({str(e).splitlines()[0]})", ep) from None
            tree = _read_tree(grp, path, ep)
            episode, layout = _episode_from_tree(tree, entry, path, ep, declared)
            if layout0 is None:
                layout0 = layout
            elif layout != layout0:
                raise _err(path, f"observation layout {layout} differs from the first episode's {layout0}", ep)
            if episodes and episode.actions.shape[1] != episodes[0].actions.shape[1]:
                raise _err(path, f"act_dim {episode.actions.shape[1]} differs from the first episode's "
                                 f"{episodes[0].actions.shape[1]}", ep)
            episodes.append(episode)
        extra = sorted(n for n in names - listed if n.startswith("traj_"))
        if extra:
            raise _err(path, f"{len(extra)} trajectory group(s) ({', '.join(extra[:3])}) are not listed in "
                             f"{json_path(path).name}: the pair is inconsistent (interrupted write?)")
    offrl_meta = meta.setdefault("offrl", {})
    if layout0 != [["obs", episodes[0].obs.shape[1]]]:
        offrl_meta["obs_layout"] = layout0  # dict observations (obs_mode=state_dict) name their own fields
    stored = offrl_meta.get("obs_layout")
    if stored is not None and sum(int(s) for _, s in stored) != episodes[0].obs.shape[1]:
        raise _err(json_path(path), f"obs_layout sums to {sum(int(s) for _, s in stored)} but obs has "
                                    f"{episodes[0].obs.shape[1]} columns")
    return episodes, meta


# ------------------------------------------------------------------------------------------ writing

def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _put(group: Any, name: str, data: np.ndarray) -> None:
    data = np.asarray(data)
    kw: dict[str, Any] = {}
    if data.dtype == np.uint8 and data.ndim >= 3:
        kw.update(compression="gzip", compression_opts=5, chunks=(1,) + data.shape[1:])
    elif data.size and data.ndim >= 1 and data.dtype.kind in "fiub":
        kw.update(fletcher32=True)
    group.create_dataset(name, data=data, **kw)


def _put_tree(group: Any, tree: dict) -> None:
    for k, v in tree.items():
        if isinstance(v, dict):
            _put_tree(group.create_group(k, track_order=True), v)
        else:
            _put(group, k, v)


def _nest(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        node = out
        parts = name.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(path: Path, log: Any = None) -> list[Path]:
    """Remove the temporary files (``.<stem>.tmp-<pid>.h5`` / ``.json``) an earlier write of ``path`` left
    behind when its process was killed (SIGKILL, power loss): only those whose process is gone, so a
    write in progress elsewhere keeps its own. Says so in one note line (``log``, default stderr)."""
    import re
    import sys

    pattern = re.compile(rf"^\.{re.escape(path.stem)}\.tmp-(\d+)\.(h5|json)$")
    removed = []
    if path.parent.is_dir():
        for f in sorted(path.parent.iterdir()):
            m = pattern.match(f.name)
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                try:
                    f.unlink()
                    removed.append(f)
                except OSError:
                    pass
    if removed:
        pids = sorted({int(pattern.match(f.name).group(1)) for f in removed})
        note = (f"[offrl] note: removed {len(removed)} stale temporary file(s) of {path.name} left by killed "
                f"write(s) (pid {', '.join(map(str, pids))}): {', '.join(f.name for f in removed)}")
        (log or (lambda m: sys.stderr.write(m + "\n")))(note)
    return removed


def write_trajectories(path: str | Path, episodes: list[Episode], meta: dict, progress: bool = False) -> Path:
    """Write episodes and metadata as a ManiSkill trajectory pair (``path`` and its .json), atomically.

    Episodes are renumbered ``traj_0 .. traj_{n-1}``. Both files are written to temporary names in the
    same folder and renamed only when complete, so an interrupted write leaves no partial dataset; the
    temporary files of an earlier write that was killed are removed first (:func:`remove_stale_temps`).
    """
    import h5py

    path = Path(path)
    if path.suffix != ".h5":
        raise OffrlError(f"dataset files end in .h5 (ManiSkill's format), got {path}")
    if not episodes:
        raise OffrlError(f"refusing to write {path}: no episodes")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tag = f".tmp-{os.getpid()}"
    tmp_h5 = path.with_name(f".{path.stem}{tag}.h5")
    tmp_json = path.with_name(f".{path.stem}{tag}.json")
    meta = dict(meta)
    offrl_meta = dict(meta.get("offrl", {}))
    offrl_meta["format_version"] = FORMAT_VERSION
    e0 = episodes[0]
    declared = ["obs", "actions", "terminated", "truncated"] + (["success"] if e0.success is not None else [])
    declared += sorted(e0.rewards) + (["env_states"] if e0.env_states is not None else [])
    offrl_meta["datasets"] = declared
    meta["offrl"] = offrl_meta
    json_eps = []
    it = enumerate(episodes)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(episodes), desc=f"write {path.name}", unit="ep", leave=False, disable=None)
    try:
        with h5py.File(tmp_h5, "w", track_order=True) as f:
            for i, e in it:
                g = f.create_group(f"traj_{i}", track_order=True)
                _put(g, "obs", e.obs.astype(np.float32, copy=False))
                _put(g, "actions", e.actions.astype(np.float32, copy=False))
                _put(g, "terminated", e.terminated.astype(bool))
                _put(g, "truncated", e.truncated.astype(bool))
                if e.success is not None:
                    _put(g, "success", e.success.astype(bool))
                for k in sorted(e.rewards):
                    _put(g, k, e.rewards[k].astype(np.float32))
                if e.env_states is not None:
                    _put_tree(g.create_group("env_states", track_order=True), e.env_states)
                _put_tree(g, _nest(e.extras))
                info = {"episode_id": i, **e.info}
                info["elapsed_steps"] = e.length
                if e.succeeded is not None:
                    info["success"] = e.succeeded
                json_eps.append(info)
        tmp_json.write_text(json.dumps({**meta, "episodes": json_eps}, indent=2, default=_json_default))
        os.replace(tmp_h5, path)
        os.replace(tmp_json, json_path(path))
    finally:
        for t in (tmp_h5, tmp_json):
            if t.exists():
                t.unlink()
    return path
