"""Dataset summaries and plots (``offrl inspect``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from offrl.data.dataset import OfflineDataset

#: observation fields plotted as end-effector / object positions (first three columns are x, y, z)
EE_FIELDS = ("extra/tcp_pose", "tcp_pose", "ee_pose", "extra/ee_pose", "eef_pos", "ee_pos")
OBJ_FIELDS = ("extra/obj_pose", "obj_pose", "object_pose", "obj_pos")
GOAL_FIELDS = ("extra/goal_pos", "goal_pos")


def _stats(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(x)), "std": float(np.std(x)), "min": float(np.min(x)),
            "p50": float(np.median(x)), "max": float(np.max(x))}


def summarize(ds: OfflineDataset) -> dict[str, Any]:
    """Numbers that describe a dataset: sizes, lengths, success, per-dimension action ranges, returns."""
    lengths = ds.lengths
    actions = np.concatenate([e.actions for e in ds.episodes])
    success = ds.success
    out: dict[str, Any] = {
        "path": ds.name, "env_id": ds.env_id, "control_mode": ds.control_mode, "obs_mode": ds.obs_mode,
        "source": ds.meta.get("source_type"), "episodes": len(ds), "steps": ds.num_steps,
        "obs_dim": ds.obs_dim, "act_dim": ds.act_dim, "env_states": ds.has_env_states,
        "length": _stats(lengths),
        "success_rate": None if success is None else float(success.mean()),
        "terminated": int(sum(bool(e.terminated[-1]) for e in ds.episodes)),
        "truncated": int(sum(bool(e.truncated[-1]) for e in ds.episodes)),
        "action_min": actions.min(0).tolist(), "action_max": actions.max(0).tolist(),
        "action_mean": actions.mean(0).tolist(), "action_std": actions.std(0).tolist(),
        "returns": {},
        "obs_layout": ds.obs_layout,
    }
    for key in ds.reward_keys:
        out["returns"][key] = _stats(ds.returns(key))
    return out


def format_summary(s: dict[str, Any]) -> str:
    """The summary as an aligned text table."""
    L = s["length"]
    rows = [
        ("dataset", s["path"]), ("env / control mode", f"{s['env_id']} / {s['control_mode']} (obs_mode {s['obs_mode']})"),
        ("source", s["source"] or "unknown"),
        ("episodes", s["episodes"]), ("steps", s["steps"]),
        ("obs / action size", f"{s['obs_dim']} / {s['act_dim']}"),
        ("episode length", f"mean {L['mean']:.1f}  std {L['std']:.1f}  min {L['min']:.0f}  "
                           f"median {L['p50']:.0f}  max {L['max']:.0f}"),
        ("success rate", "n/a (no success flags)" if s["success_rate"] is None else f"{100 * s['success_rate']:.1f}%"),
        ("ended by", f"terminated {s['terminated']}, truncated {s['truncated']}, "
                     f"neither {s['episodes'] - s['terminated'] - s['truncated']}"),
        ("env states", "yes" if s["env_states"] else "no"),
    ]
    for key, r in s["returns"].items():
        rows.append((f"return ({key})", f"mean {r['mean']:.3f}  std {r['std']:.3f}  min {r['min']:.3f}  max {r['max']:.3f}"))
    if not s["returns"]:
        rows.append(("returns", "n/a (no rewards stored)"))
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append("")
    lines.append(f"{'action dim':<10} {'min':>9} {'max':>9} {'mean':>9} {'std':>9}")
    for i in range(s["act_dim"]):
        lines.append(f"{i:<10} {s['action_min'][i]:>9.3f} {s['action_max'][i]:>9.3f} "
                     f"{s['action_mean'][i]:>9.3f} {s['action_std'][i]:>9.3f}")
    return "\n".join(lines)


def plot_dir(ds: OfflineDataset, out_dir: Optional[str | Path] = None) -> Path:
    """Where plots go: ``<dataset stem>_inspect/`` next to the dataset unless given."""
    if out_dir is not None:
        return Path(out_dir)
    p = Path(ds.name)
    return p.with_name(p.stem + "_inspect")


def write_plots(ds: OfflineDataset, out_dir: Path) -> list[Path]:
    """PNG plots: episode lengths, action histograms, and end-effector / object paths in the xy plane."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    success = ds.success

    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = ds.lengths
    bins = np.arange(lengths.min(), lengths.max() + 2) - 0.5
    if success is None:
        ax.hist(lengths, bins=bins, color="tab:blue")
    else:
        ax.hist([lengths[success], lengths[~success]], bins=bins, stacked=True,
                color=["tab:green", "tab:red"], label=["success", "failure"])
        ax.legend()
    ax.set(xlabel="episode length (steps)", ylabel="episodes", title=f"{ds.env_id}: {len(ds)} episodes")
    fig.tight_layout()
    written.append(out_dir / "episode_lengths.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    actions = np.concatenate([e.actions for e in ds.episodes])
    a = actions.shape[1]
    cols = min(a, 4)
    rows = (a + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= a:
            ax.axis("off")
            continue
        ax.hist(actions[:, i], bins=41, color="tab:blue")
        ax.set_title(f"action[{i}]", fontsize=9)
    fig.suptitle(f"actions ({ds.control_mode})")
    fig.tight_layout()
    written.append(out_dir / "action_histograms.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    ee, obj, goal = ds.field_slice(*EE_FIELDS), ds.field_slice(*OBJ_FIELDS), ds.field_slice(*GOAL_FIELDS)
    if ee is not None or obj is not None:
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
        show = list(range(min(len(ds), 50)))
        for j, i in enumerate(show):
            o = ds.episodes[i].obs
            if ee is not None and ee.stop - ee.start >= 2:
                ax.plot(o[:, ee.start], o[:, ee.start + 1], color="tab:blue", alpha=0.4, lw=1,
                        label="end effector" if j == 0 else None)
            if obj is not None and obj.stop - obj.start >= 2:
                ax.plot(o[:, obj.start], o[:, obj.start + 1], color="tab:orange", alpha=0.6, lw=1,
                        label="object" if j == 0 else None)
                ax.scatter(o[0, obj.start], o[0, obj.start + 1], color="tab:orange", s=8)
            if goal is not None:
                ax.scatter(o[0, goal.start], o[0, goal.start + 1], color="tab:green", marker="x", s=16,
                           label="goal" if j == 0 else None)
        ax.set(xlabel="x (m)", ylabel="y (m)", title=f"paths in the xy plane ({len(show)} episodes)")
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "trajectories_xy.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
