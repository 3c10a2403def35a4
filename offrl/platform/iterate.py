"""The reverse-to-forward loop (``offrl iterate``): test -> collect -> finetune, resumable.

Iteration ``i`` lives in ``<iterate.root>/iter_<i>/`` and has three steps, each finished when its output exists:

1. ``alternate/alternate.json``: the alternating test (:func:`offrl.platform.alternate.run_alternate`) of the
   current policies; every attempt is recorded in ``alternate/rollouts_{A,B}.h5``.
2. ``data_A.h5`` / ``data_B.h5``: the previous iteration's training data (iteration 0: ``iterate.data_a`` /
   ``iterate.data_b``) merged with this test's *successful* attempts of that task (``OfflineDataset.merge``, as
   ``offrl data merge`` does), so the data grows by the successes of every iteration. With ``iterate.expert_b``,
   task B's scripted expert first runs from the start state of every failed B attempt (``expert_B.h5``) and
   its successful episodes join B's data too.
3. ``finetune/A`` and ``finetune/B``: pretraining runs initialised from the current policy (its actor, with the
   observation normaliser it was trained with) for ``iterate.steps_per_iter`` gradient steps on the merged data,
   under the policy's own training config; their evaluated checkpoint becomes the next iteration's policy.

The last iteration (``max_iterations - 1``) only tests. The loop also stops after an iteration whose test
collected no successful attempt (nothing to learn from). ``iterate.json`` records every finished step;
running the same command again continues where it stopped: a step interrupted half-way is redone (the test),
rewritten (the merge, written atomically) or resumed from its last checkpoint (the finetuning runs).
``iterate.md`` and ``iterate.png`` summarise consecutive_success and the per-task success rates by iteration.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from offrl.errors import OffrlError

STATE = "iterate.json"


def policy_checkpoint(path: str | Path) -> Path:
    """The checkpoint a run reports (its ``eval.json`` names the evaluated one), or the latest one."""
    from offrl.platform.checkpoint import resolve_checkpoint

    p = Path(path)
    ev = p / "eval.json"
    if p.is_dir() and ev.is_file():
        try:
            named = json.loads(ev.read_text()).get("checkpoint")
        except ValueError:
            named = None
        if named and Path(named).exists():
            return resolve_checkpoint(named)
    return resolve_checkpoint(p)


def _save_state(root: Path, state: dict) -> None:
    tmp = root / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(root / STATE)


def _successes(path: Path) -> Optional[Any]:
    from offrl.data.dataset import OfflineDataset

    if not path.exists():
        return None
    ds = OfflineDataset.load(path)
    keep = [i for i, e in enumerate(ds.episodes) if e.succeeded]
    return ds.subset(keep) if keep else None


def merge_successes(prev: str | Path, rollouts: str | Path, out: Path, extra: Optional[str | Path] = None) -> dict:
    """``prev`` + the successful episodes of ``rollouts`` (+ every episode of ``extra``, e.g. expert
    demonstrations) -> ``out`` (atomic). Refuses an empty merge."""
    from offrl.data.dataset import OfflineDataset

    base = OfflineDataset.load(prev)
    wins = _successes(Path(rollouts))
    more = OfflineDataset.load(extra) if extra else None
    if wins is None and more is None:
        raise OffrlError(f"{rollouts}: no successful rollouts to merge (an empty rollout set)")
    merged = OfflineDataset.merge([d for d in (base, wins, more) if d is not None])
    merged.save(out)
    report = {"base": str(prev), "base_episodes": len(base), "added": len(wins) if wins is not None else 0,
              "episodes": len(merged)}
    if extra:
        report["expert_added"] = len(more)
    return report


def expert_from_failures(rollouts: str | Path, out: Path, log: Any = print) -> dict:
    """The task's scripted expert, started from the recorded first state of every failed attempt in
    ``rollouts``; its successful episodes are written to ``out`` (atomic) in the rollouts' format.

    B is the easy task of the pair, the one with an expert: this gives B demonstrations from the start states
    the chains actually produce (A's end states), which B's own resets never show."""
    from offrl.data.collect import run_episode, state_at
    from offrl.data.dataset import OfflineDataset
    from offrl.data.reverse import make_task_env
    from offrl.envs.experts import expert_class, expert_for_env

    if not Path(rollouts).exists():  # no attempt at this task in the test
        return {"failed_attempts": 0, "expert_successes": 0, "path": None}
    ds = OfflineDataset.load(rollouts)
    failed = [(i, e) for i, e in enumerate(ds.episodes) if not e.succeeded]
    if failed and ds.episodes[0].env_states is None:
        raise OffrlError(f"{rollouts}: the attempts carry no env states to start the expert from")
    report = {"failed_attempts": len(failed), "expert_successes": 0, "path": None}
    if not failed:
        return report
    env = make_task_env(ds.env_id, ds)
    ex = expert_class(expert_for_env(ds.env_id))(1)
    kept = []
    try:
        for i, e in failed:
            seed = int(e.info.get("episode_seed", i))
            ep = run_episode(env, ex, seed, ds.max_episode_steps, start_state=state_at(e.env_states, 0))
            if ep.succeeded:
                ep.info["expert_from"] = f"{Path(rollouts).name}#{i}"
                kept.append(ep)
    finally:
        env.close()
    report["expert_successes"] = len(kept)
    log(f"[iterate] expert from {len(failed)} failed attempts' start states: {len(kept)} successful demonstrations")
    if kept:
        meta = dict(ds.meta)
        meta["source_type"] = "offrl-scripted-expert"
        meta["source_desc"] = f"offrl iterate: the scripted expert from the start states of failed attempts in {Path(rollouts).name}"
        OfflineDataset(kept, meta).save(out)
        report["path"] = str(out)
    return report


def _finetune(ckpt: Path, data: Path, run_root: Path, trial: str, it_cfg: Any, log: Any) -> Path:
    """Pretraining initialised from ``ckpt`` on ``data`` under the checkpoint's own config; resumes a run
    that was interrupted. Returns the run directory."""
    from offrl.config import apply_overrides, from_dict
    from offrl.platform.checkpoint import checkpoint_json, latest_checkpoint
    from offrl.platform.pretrain import run_pretrain_job

    epochs = max(1, math.ceil(it_cfg.steps_per_iter / it_cfg.steps_per_epoch))
    cfg = from_dict(apply_overrides(checkpoint_json(ckpt, "config.json"), [
        f"pretrain.dataset={data}", f"pretrain.epochs={epochs}", f"pretrain.steps_per_epoch={it_cfg.steps_per_epoch}",
        f"pretrain.eval_episodes={it_cfg.eval_episodes}", "pretrain.eval_every=0", f"pretrain.checkpoint_every={epochs}",
        "pretrain.num_episodes=null", f"run.root={run_root}", "run.experiment=finetune", f"run.trial={trial}",
        "run.progress=false"]))
    run = run_root / "finetune" / trial
    if (run / "eval.json").exists():
        return run
    resume = latest_checkpoint(run / "checkpoints") is not None
    if run.exists() and not resume:
        shutil.rmtree(run)  # started, but nothing worth keeping
    log(f"[iterate] finetune {trial} from {ckpt} on {data} for {epochs} x {it_cfg.steps_per_epoch} steps"
        + (" (resuming)" if resume else ""))
    return run_pretrain_job(cfg, resume=resume, init_from=None if resume else str(ckpt), init_parts=["actor"],
                            log=log)


def _check_inputs(c: Any) -> None:
    from offrl.data.dataset import OfflineDataset
    from offrl.envs.tasks import TASK_A, TASK_B

    from offrl.platform.checkpoint import checkpoint_json

    for key in ("policy_a", "policy_b", "data_a", "data_b"):
        if not getattr(c, key):
            raise OffrlError(f"config key 'iterate.{key}': required (see offrl config keys --prefix iterate.)")
    for key, want in (("policy_a", TASK_A), ("policy_b", TASK_B)):
        ckpt = policy_checkpoint(getattr(c, key))
        got = checkpoint_json(ckpt, "config.json").get("env", {}).get("id")
        if got != want:
            raise OffrlError(f"config key 'iterate.{key}': {ckpt} was trained for {got}, expected {want}")
    for key, want in (("data_a", TASK_A), ("data_b", TASK_B)):
        ds = OfflineDataset.load(getattr(c, key))
        if ds.env_id != want:
            raise OffrlError(f"config key 'iterate.{key}': {getattr(c, key)} holds {ds.env_id} data, expected {want}")


def _row(i: int, it: dict) -> Optional[dict]:
    alt = it.get("alternate")
    if not alt:
        return None
    return {"iteration": i, "consecutive_success": alt["consecutive_success"]["mean"],
            "cs_ci95": alt["consecutive_success"]["ci95"], "cs_median": alt["consecutive_success"]["median"],
            "A": alt["A_success_rate"], "B": alt["B_success_rate"],
            "added_A": (it.get("merge", {}).get("A") or {}).get("added", 0),
            "added_B": (it.get("merge", {}).get("B") or {}).get("added", 0),
            "expert_B": (it.get("merge", {}).get("B") or {}).get("expert_added"),
            "eval_A": it.get("eval", {}).get("A"), "eval_B": it.get("eval", {}).get("B")}


def write_summary(root: Path, state: dict) -> str:
    rows = [r for i, it in enumerate(state["iterations"]) if (r := _row(i, it))]
    lines = ["| iteration | consecutive_success mean [95% CI] (median) | A_success_rate [95% CI] (attempts) | "
             "B_success_rate [95% CI] (attempts) | successes merged A / B (+ B expert demonstrations) | "
             "own-task success after finetuning A / B |",
             "|---:|---|---|---|---|---|"]
    for r in rows:
        a, b = r["A"], r["B"]
        ev = " / ".join("-" if r[k] is None else f"{r[k]:.2f}" for k in ("eval_A", "eval_B"))
        rate = {t: "- (0)" if x["mean"] is None else
                f"{x['mean']:.2f} [{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}] ({x['attempts']})" for t, x in (("A", a), ("B", b))}
        lines.append(f"| {r['iteration']} | {r['consecutive_success']:.2f} [{r['cs_ci95'][0]:.2f}, {r['cs_ci95'][1]:.2f}] "
                     f"({r['cs_median']:.1f}) | {rate['A']} | {rate['B']} | {r['added_A']} / {r['added_B']}"
                     + (f" + {r['expert_B']} expert" if r["expert_B"] else "") + f" | {ev} |")
    text = "\n".join(lines)
    (root / "iterate.md").write_text(text + "\n")
    if rows:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import numpy as np

            x = [r["iteration"] for r in rows]
            fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
            cs = [r["consecutive_success"] for r in rows]
            ax[0].errorbar(x, cs, yerr=[[c - r["cs_ci95"][0] for c, r in zip(cs, rows)],
                                        [r["cs_ci95"][1] - c for c, r in zip(cs, rows)]], marker="o", capsize=3)
            ax[0].set_xlabel("iteration")
            ax[0].set_ylabel("consecutive_success (mean, 95% CI)")
            for t, col in (("A", "tab:red"), ("B", "tab:green")):
                m = [np.nan if r[t]["mean"] is None else r[t]["mean"] for r in rows]
                ax[1].errorbar(x, m, yerr=[[v - r[t]["ci95"][0] for v, r in zip(m, rows)],
                                           [r[t]["ci95"][1] - v for v, r in zip(m, rows)]], marker="o", capsize=3,
                               color=col, label=f"{t}_success_rate")
            ax[1].set_ylim(0, 1.05)
            ax[1].set_xlabel("iteration")
            ax[1].legend(fontsize=8)
            for a_ in ax:
                a_.set_xticks(x)
            fig.tight_layout()
            fig.savefig(root / "iterate.png", dpi=110)
            plt.close(fig)
        except ImportError:
            pass
    return text


def run_iterate(cfg: Any, log: Any = print) -> dict:
    """Run (or continue) the loop of ``cfg.iterate``; returns the state written to ``iterate.json``."""
    from offrl.platform.alternate import run_alternate

    c = cfg.iterate
    root = Path(c.root)
    state_path = root / STATE
    if not state_path.exists():
        _check_inputs(c)  # before anything is written
    root.mkdir(parents=True, exist_ok=True)
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except ValueError:
            raise OffrlError(f"{state_path}: unreadable; remove it (and {root}) to start the loop again") from None
        if state.get("settings", {}).get("policy_a") != c.policy_a or state["settings"].get("data_a") != c.data_a:
            raise OffrlError(f"{root} holds a loop started from other policies or data; choose another iterate.root")
        log(f"[iterate] continuing {root} ({len(state['iterations'])} iteration(s) recorded)")
    else:
        state = {"settings": {k: getattr(c, k) for k in c.__dataclass_fields__}, "iterations": [], "stopped": None}
        _save_state(root, state)
    policies = {"A": str(policy_checkpoint(c.policy_a)), "B": str(policy_checkpoint(c.policy_b))}
    data = {"A": c.data_a, "B": c.data_b}
    for it in state["iterations"]:  # the latest finished policies and data
        if it.get("next_policies"):
            policies = dict(it["next_policies"])
        if it.get("data"):
            data = dict(it["data"])
    for i in range(c.max_iterations):
        if state.get("stopped"):
            break
        if i < len(state["iterations"]) and state["iterations"][i].get("done"):
            continue
        if i == len(state["iterations"]):
            state["iterations"].append({"policies": dict(policies)})
            _save_state(root, state)
        it = state["iterations"][i]
        d = root / f"iter_{i}"
        t0 = time.time()
        if "alternate" not in it:
            log(f"[iterate] iteration {i}: alternating test of A={it['policies']['A']} B={it['policies']['B']}")
            summary = run_alternate(it["policies"]["A"], it["policies"]["B"], chains=c.chains, max_cycles=c.max_cycles,
                                    horizon=c.horizon, seed=cfg.seed + 1000 * i, out=d / "alternate", overwrite=True,
                                    log=log)
            it["alternate"] = {k: summary[k] for k in ("consecutive_success", "A_success_rate", "B_success_rate",
                                                      "chains", "max_cycles", "horizon", "seed", "seconds")}
            _save_state(root, state)
        last = i == c.max_iterations - 1
        wins = {t: it["alternate"][f"{t}_success_rate"]["successes"] for t in "AB"}
        if last or not any(wins.values()):
            it["done"] = True
            state["stopped"] = "max_iterations" if last else f"iteration {i} collected no successful attempt"
            _save_state(root, state)
            log(f"[iterate] stopped: {state['stopped']}")
            break
        if c.expert_b and "expert_b" not in it:
            it["expert_b"] = expert_from_failures(d / "alternate" / "rollouts_B.h5", d / "expert_B.h5", log)
            _save_state(root, state)
        if "merge" not in it:
            it["merge"], new_data = {}, dict(data)
            for t in "AB":
                out = d / f"data_{t}.h5"
                extra = (it.get("expert_b") or {}).get("path") if t == "B" else None
                if wins[t] or extra:
                    it["merge"][t] = merge_successes(data[t], d / "alternate" / f"rollouts_{t}.h5", out, extra)
                    new_data[t] = str(out)
                    log(f"[iterate] data {t}: {it['merge'][t]['base_episodes']} + {it['merge'][t]['added']} successes"
                        + (f" + {it['merge'][t]['expert_added']} expert demonstrations" if extra else "") + f" -> {out}")
                else:
                    it["merge"][t] = None
                    log(f"[iterate] data {t}: no successful {t} attempt, the data stays {data[t]}")
            it["data"] = new_data
            _save_state(root, state)
        data = dict(it["data"])
        nxt = dict(it.get("next_policies") or {})
        it.setdefault("eval", {})
        for t in "AB":
            if t in nxt:
                continue
            run = _finetune(Path(it["policies"][t]), Path(data[t]), d, t, c, log)
            nxt[t] = str(policy_checkpoint(run))
            ev = json.loads((run / "eval.json").read_text())
            it["eval"][t] = ev["success_once"]["mean"]
            it["next_policies"] = dict(nxt)
            _save_state(root, state)
        policies = dict(nxt)
        it["done"] = True
        it["seconds"] = it.get("seconds", 0.0) + time.time() - t0
        _save_state(root, state)
        write_summary(root, state)
    text = write_summary(root, state)
    log(text)
    log(f"[iterate] wrote {root / STATE}, {root / 'iterate.md'}" + (", iterate.png" if (root / "iterate.png").exists() else ""))
    return state
