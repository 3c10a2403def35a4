"""Finetuning start points: IQL critics trained on the clean demos only vs on clean + noisy + failed episodes.

Builds (once; finished steps are skipped on a rerun) the data of ``tune_configs/finetune_start.yaml``:
100 clean scripted PickCube-v1 demos, 100 episodes with action noise 0.3 and 100 with noise 0.1 (failures
kept), their merge, and 1,000 clean demos (``clean1000``, whose first 100 episodes are ``clean``'s: the
offline mix of RLPD's size that the README's "The lever is the offline data" runs use); then two
``bc+iql`` runs with the same BC actor (clean demos) whose critics differ only in their data:
``bc_iql_sparse_clean`` (the clean demos) and ``bc_iql_sparse_mix`` (the merge). Both critics are scored
on a held-out test set of fresh noisy episodes (noise 0.3, failures kept, seeds no run saw),
which is what finetuning shows them: actions other than the expert's.

- ``td_error``: mean (Q(s, a) - r - gamma V(s') (1 - terminated))^2 with the critic's own V;
- ``corr(Q, G)``: Spearman rank correlation of Q(s, a) with the observed discounted return G_t;
- ``AUC V -> success``: how well V(s_10) ranks the test episodes that later succeed above those that fail
  (0.5 is chance);
- ``expert > noisy``: fraction of test states where Q(s, a) ranks the stored action above that action plus
  fresh Gaussian noise of std 0.3, for the successful test episodes (whose actions are the better ones).

    python bench/finetune_start.py [--root runs] [--test-episodes 50]

Data go to ``<root>/finetune_start/data``, the runs to ``<root>/finetune_start/<trial>`` (the paths of
``tune_configs/finetune_start.yaml`` with the default root), the table to ``<root>/finetune_start/finetune_start.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _sh(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "offrl", *args], check=True)


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="runs", help="run.root of the two runs; data under <root>/finetune_start/data")
    ap.add_argument("--test-episodes", type=int, default=50, help="held-out noisy episodes to score the critics on")
    args = ap.parse_args()

    root = Path(args.root)
    exp = root / "finetune_start"
    data = exp / "data"
    collect = "tune_configs/collect_pickcube.yaml"
    sets = {"clean": ["collect.episodes=100"],
            "noisy03": ["collect.episodes=100", "seed=1", "collect.action_noise=0.3", "collect.keep_failures=true"],
            "noisy01": ["collect.episodes=100", "seed=2", "collect.action_noise=0.1", "collect.keep_failures=true"],
            "clean1000": ["collect.episodes=1000"],
            "test03": [f"collect.episodes={args.test_episodes}", "seed=9", "collect.action_noise=0.3",
                       "collect.keep_failures=true"]}
    for name, extra in sets.items():
        if not (data / f"{name}.h5").exists():
            _sh("collect", collect, *extra, f"collect.output={data / name}.h5", "run.progress=false")
    mix = data / "critic_mix.h5"
    if not mix.exists():
        _sh("data", "merge", "-o", str(mix), *(str(data / f"{n}.h5") for n in ("clean", "noisy03", "noisy01")))
    runs = {"clean": "bc_iql_sparse_clean", "mix": "bc_iql_sparse_mix"}
    for part, trial in runs.items():
        run = exp / trial
        if not (run / "pretrain_done.json").exists():
            crit = f"pretrain.critic_dataset={mix if part == 'mix' else ''}"
            _sh("pretrain", "tune_configs/finetune_start.yaml", f"pretrain.dataset={data / 'clean.h5'}", crit,
                f"run.root={root}", f"run.trial={trial}", "run.progress=false")

    rows = [(part, score(exp / trial, data / "test03.h5")) for part, trial in runs.items()]
    lines = ["| critics trained on | episodes (successful) | held-out td_error | corr(Q, G) | AUC V -> success | "
             "expert > noisy | BC success (actor) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for part, s in rows:
        lines.append(f"| {part} | {s['episodes']} ({s['successful']}) | {s['td_error']:.4f} | {s['corr_q_g']:.3f} | "
                     f"{s['auc']:.3f} | {s['prefer']:.3f} | {s['bc_success']:.2f} |")
    table = "\n".join(lines)
    print(table)
    (exp / "finetune_start.md").write_text(table + "\n")
    (exp / "finetune_start.json").write_text(json.dumps(dict(rows), indent=1))
    return 0


def score(run: Path, test: Path) -> dict:
    """The critics of ``run`` on the held-out episodes in ``test``."""
    import numpy as np
    import torch
    from scipy.stats import mannwhitneyu, spearmanr

    from offrl.algos.critics import build_critics
    from offrl.config import from_dict
    from offrl.data.dataset import OfflineDataset
    from offrl.platform.checkpoint import checkpoint_json, latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(run / "checkpoints")
    cfg = from_dict(checkpoint_json(ckpt, "config.json"))
    state = checkpoint_json(ckpt, "training_state/state.json")
    ds = OfflineDataset.load(test)
    c = build_critics(cfg.critic, ds.obs_dim, ds.act_dim, state.get("critic_obs_ignore") or ())
    load_checkpoint(ckpt, {"critics": c}, parts=["critics"], restore_rng=False)
    c.eval()
    g = cfg.pretrain.gamma
    t = ds.transitions(cfg.pretrain.reward)
    ret = ds.mc_returns(g, cfg.pretrain.reward)
    with torch.no_grad():
        q = c.q.min(t["obs"], t["action"])
        y = t["reward"] + g * c.v(t["next_obs"]) * (~t["terminated"]).float()
        td = float((q - y).pow(2).mean())
        corr = float(spearmanr(q.numpy(), ret.numpy()).statistic)
        early = t["step"] == 10
        v10 = c.v(t["obs"][early]).numpy()
        won = ds.success[t["episode"][early].numpy()]
        auc = float(mannwhitneyu(v10[won], v10[~won]).statistic / (won.sum() * (~won).sum()))
        good = torch.from_numpy(ds.success[t["episode"].numpy()])
        gen = torch.Generator().manual_seed(0)
        a = t["action"][good]
        noisy = (a + 0.3 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
        prefer = float((c.q.min(t["obs"][good], a) > c.q.min(t["obs"][good], noisy)).float().mean())
    ev = json.loads((run / "eval.json").read_text())
    crit = state["data"]["critics"]
    return {"td_error": td, "corr_q_g": corr, "auc": auc, "prefer": prefer, "episodes": crit["episodes"],
            "successful": crit["successful_episodes"], "bc_success": ev["success_once"]["mean"],
            "test_episodes": len(ds), "test_successes": int(np.sum(ds.success))}


if __name__ == "__main__":
    sys.exit(main())
