"""The offline RL workflow (``offrl workflow``): overfitting or underfitting, the correction and the checkpoint,
from a pretraining run's curves alone, with no online evaluation.

Kumar, Singh, Tian, Finn, Levine, "A Workflow for Offline Model-Free Robotic Reinforcement Learning",
CoRL 2021. The curves are the ``workflow/*`` columns of ``metrics.csv`` (step = epoch; names in
:mod:`offrl.metrics`, ``WF_*``). ``eval/success_rate`` is shown when logged but never used.

Smoothing. Every curve is smoothed by a running median over ``smooth`` epochs (default 3; capped at the
epochs logged) whose ends are mirrored (``x_0 := x_2``, ``x_{n+1} := x_{n-1}``), so one outlying epoch, the
first or last included, makes neither a peak nor a fall. ``~x`` is a smoothed curve and t_1 < ... < t_n the epochs where it is logged.

Overfitting: the average dataset Q rises, then falls with more gradient steps.
    Q = workflow/dataset_q_train (the paper's choice), else workflow/dataset_q_val; at least 3 epochs.
    k = argmax_i ~Q_i (the first), the peak epoch is t_k
    rise = ~Q_k - ~Q_1,  drop = ~Q_k - ~Q_n,  scale = max_i |~Q_i|
    overfitting  <=>  rise > 0, drop > 0, drop >= drop_fraction * rise and drop >= min_drop * scale
    defaults: drop_fraction = 0.25, min_drop = 0.05

Underfitting: the training TD error, or CQL's regulariser, stays large.
    D = workflow/td_error_train, else workflow/td_error_val; the tail is its last max(2, ceil(tail * m)) of
    m logged epochs (default tail = 0.5, the second half); Qbar = mean |~Q| over the last
    max(2, ceil(tail * n)) epochs of Q.
    level    = ~D_m / (Qbar^2 + 1e-8)   (the mean squared TD error relative to the squared scale of Q)
    decrease = -b * (t_m - t_tail) / |mean of ~D over the tail|,  b the least-squares slope of ~D over the
               tail: the relative fall across the tail that the fitted line predicts
    D stays large  <=>  level >= td_level and decrease < td_decrease      (defaults 0.1 and 0.2)
    C = workflow/cql_regularizer (logsumexp_a Q - Q(data), CQL only): the same test with
    level = ~C_m / (Qbar + 1e-8) against cql_level (default 1.0).
    underfitting  <=>  D or C stays large. ~D_m / ~D_1 is reported too. A curve with fewer than 3 logged
    epochs is not tested (and reported so).

Both: the regime is "overfitting", underfitting is flagged too and addressed second. The paper treats the
two apart; we put overfitting first because its first remedy needs no retraining (stop at the selected
checkpoint) and because more capacity makes an overfitting critic overfit more.

Corrections (the paper's), printed as config overrides with example values:
    overfitting  -> regularise the critic: a variational information bottleneck (critic.vib_size,
                    critic.vib_weight; the paper's choice), dropout (critic.dropout), L2 (critic.weight_decay),
                    L1 (critic.l1)
    underfitting -> capacity: a bigger critic (critic.hidden), residual layers (critic.residual), DR3
                    (critic.dr3_weight)

Checkpoint (only folders ``checkpoints/<epoch>/`` are selectable; ``checkpoints/best/`` is not):
    overfitting -> the saved checkpoint nearest the peak epoch, the earlier one on a tie (Q is already
                   falling after the peak); the reason says whether it is at, before or after the peak
    otherwise   -> the last one (there is no peak to stop at, and it has trained the longest)

Sweeps: every run directory under the folder (:func:`offrl.stats.load.find_runs`) is analysed; a trial that
cannot be (no workflow curves, fewer than 3 epochs, no checkpoint, a non-finite value, ...) is listed with
its reason, unranked. The others are ranked, without online evaluation, by
    1. not underfitting before underfitting (a critic that cannot fit its own data is not trusted);
    2. then the score, higher first: the smoothed held-out dataset Q (workflow/dataset_q_val; the training
       one where a trial lacks it) at the selected checkpoint's epoch (linear interpolation between
       logged epochs). A conservative critic's dataset Q falls where it overfits (the paper's signal);
       on held-out episodes it rewards a critic that stays high on data it was not fit to;
    3. then the trial id.
Q values are comparable only at equal reward, discount and conservatism; a note names the keys in
``SCALE_KEYS`` whose values differ between the ranked trials.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from offrl import metrics as M
from offrl.errors import OffrlError

MIN_EPOCHS = 3
EPS = 1e-8
Q_COLUMNS = (M.WF_DATASET_Q_TRAIN, M.WF_DATASET_Q_VAL)
TD_COLUMNS = (M.WF_TD_ERROR_TRAIN, M.WF_TD_ERROR_VAL)
SCALE_KEYS = ("pretrain.algo", "pretrain.reward", "pretrain.gamma", "pretrain.success_bonus",
              "pretrain.cql_alpha", "pretrain.brac_beta")
OUTPUTS = ("workflow.json", "workflow.png")


@dataclass(frozen=True)
class Rules:
    """The rule thresholds (the command's options; formulas in the module docstring)."""

    smooth: int = 3
    drop_fraction: float = 0.25
    min_drop: float = 0.05
    td_level: float = 0.1
    td_decrease: float = 0.2
    cql_level: float = 1.0
    tail: float = 0.5

    def check(self) -> "Rules":
        if self.smooth < 1 or self.smooth % 2 == 0:
            raise OffrlError(f"--smooth must be an odd number of epochs >= 1, got {self.smooth}")
        for name in ("drop_fraction", "min_drop", "td_level", "td_decrease", "cql_level"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise OffrlError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if not (math.isfinite(self.tail) and 0 < self.tail <= 1):
            raise OffrlError(f"--tail must be a fraction in (0, 1], got {self.tail}")
        return self


# ----------------------------------------------------------------------------------------------- math

def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Running median over ``window`` (odd, capped at len(y)) points with mirrored ends; [n] -> [n]."""
    y = np.asarray(y, dtype=float)
    h = min(window, len(y) - 1 + len(y) % 2) // 2
    if h == 0 or len(y) < 3:
        return y.copy()
    padded = np.pad(y, h, mode="reflect")  # ... y_2, y_1 | y_0 ... y_{n-1} | y_{n-2}, ...
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, 2 * h + 1), axis=-1)


def _tail_len(n: int, tail: float) -> int:
    return min(n, max(2, math.ceil(tail * n)))


def overfitting_evidence(epochs: np.ndarray, q: np.ndarray, rules: Rules) -> dict:
    """Peak of the smoothed dataset Q and its fall afterwards (module docstring, "Overfitting")."""
    qs = smooth(q, rules.smooth)
    k = int(np.argmax(qs))  # the first peak of ~Q
    rise, drop = float(qs[k] - qs[0]), float(qs[k] - qs[-1])  # rise = ~Q_k - ~Q_1, drop = ~Q_k - ~Q_n
    scale = float(np.max(np.abs(qs)))
    detected = rise > 0 and drop > 0 and drop >= rules.drop_fraction * rise and drop >= rules.min_drop * scale
    return {"detected": bool(detected), "peak_epoch": int(epochs[k]), "peak_q": float(qs[k]),
            "start_q": float(qs[0]), "final_q": float(qs[-1]), "rise": rise, "drop": drop,
            "drop_over_rise": drop / rise if rise > 0 else None, "drop_over_scale": drop / scale if scale else None}


def stays_large(epochs: np.ndarray, y: np.ndarray, scale: float, threshold: float, rules: Rules) -> dict:
    """Level of the smoothed curve's end relative to ``scale`` and its relative fall over the tail."""
    ys = smooth(y, rules.smooth)
    m = _tail_len(len(ys), rules.tail)
    te, ty = epochs[-m:].astype(float), ys[-m:]
    slope = float(np.polyfit(te, ty, 1)[0])
    mean = abs(float(np.mean(ty)))
    decrease = -slope * (te[-1] - te[0]) / mean if mean > 0 else 0.0  # relative fall predicted across the tail
    level = float(ys[-1]) / (scale + EPS)  # ~D_m / (Qbar^2 + eps) for TD, ~C_m / (Qbar + eps) for CQL
    return {"stays_large": bool(level >= threshold and decrease < rules.td_decrease), "first": float(ys[0]),
            "final": float(ys[-1]), "final_over_first": float(ys[-1] / ys[0]) if ys[0] else None,
            "level": level, "level_threshold": threshold, "tail_epochs": [int(te[0]), int(te[-1])],
            "tail_decrease": decrease}


def select_checkpoint(checkpoints: list[int], peak: Optional[int]) -> tuple[int, str]:
    """(epoch, reason): nearest the peak (earlier on a tie) when overfitting, else the last one."""
    if peak is None:
        return checkpoints[-1], "the last checkpoint: no dataset-Q peak to stop at"
    best = min(checkpoints, key=lambda e: (abs(e - peak), e))
    if best == peak:
        return best, f"the checkpoint at the dataset-Q peak (epoch {peak})"
    side = "before" if best < peak else "after"
    return best, (f"the saved checkpoint nearest the dataset-Q peak (epoch {peak}), {abs(best - peak)} epochs "
                  f"{side} it; save more often (pretrain.checkpoint_every) and keep more "
                  f"(pretrain.keep_checkpoints) to stop at the peak")


# ------------------------------------------------------------------------------------------- reading

@dataclass
class Curves:
    """A run's metrics merged per epoch: ``values[column][i]`` at ``epochs[i]``, NaN where not logged."""

    epochs: np.ndarray
    values: dict[str, np.ndarray]

    def series(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, values) where ``column`` is logged."""
        y = self.values.get(column, np.full(len(self.epochs), np.nan))
        ok = ~np.isnan(y)
        return self.epochs[ok], y[ok]

    def first_logged(self, columns: tuple[str, ...]) -> Optional[str]:
        return next((c for c in columns if len(self.series(c)[0])), None)


def read_curves(run_dir: Path) -> Curves:
    """``metrics.csv`` merged per step (the last non-empty cell wins); refuses a non-finite workflow value."""
    from offrl.platform.logger import read_metrics_csv

    path = run_dir / "metrics.csv"
    columns, rows = read_metrics_csv(path)  # refuses a corrupt file naming file:line
    merged: dict[int, dict[str, float]] = {}
    for row in rows:
        step = float(row["step"])
        if not math.isfinite(step):
            raise OffrlError(f"{path}: a row has step {row['step']!r}")
        epoch = int(step)
        for c in columns:
            cell = row[c].strip()
            if c == "step" or not cell:
                continue
            v = float(cell)
            if c.startswith("workflow/") and not math.isfinite(v):
                raise OffrlError(f"{path}: column {c!r} is {cell} at epoch {epoch}; the workflow needs finite "
                                 "curves (the critic diverged there)")
            merged.setdefault(epoch, {})[c] = v
    epochs = np.array(sorted(merged), dtype=int)
    values = {c: np.array([merged[e].get(c, np.nan) for e in epochs]) for c in columns if c != "step"}
    return Curves(epochs, values)


def saved_checkpoints(run_dir: Path) -> list[int]:
    """Epochs with a folder ``checkpoints/<epoch>/`` (``best/`` and temp folders are not checkpoints here)."""
    root = run_dir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml flattened to dotted keys ({} when missing or unreadable: it only feeds hints)."""
    import yaml

    from offrl.stats.load import flatten_config

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return flatten_config(data) if isinstance(data, dict) else {}


def _no_curves_message(run_dir: Path, cfg: dict) -> str:
    from offrl.config import PRETRAIN_ALGOS, PretrainConfig

    critic_algos = [a for a in PRETRAIN_ALGOS if PretrainConfig(algo=a).critic_mode]
    return (f"{run_dir} has no workflow curves ({', '.join(Q_COLUMNS)} missing or empty); they are logged by "
            f"pretrain.algo values that train critics ({', '.join(critic_algos)}), this run has "
            f"pretrain.algo={cfg.get('pretrain.algo', 'unknown')}")


# ----------------------------------------------------------------------------------------- analysis

def _override_value(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"))


def corrections(triggered: list[str], cfg: dict) -> list[dict]:
    """The paper's corrections for each triggered regime, as config overrides with example values."""
    hidden = json.loads(cfg.get("critic.hidden", "[256, 256]"))
    bigger = [2 * max(hidden)] * (len(hidden) + 1)  # twice as wide, one layer deeper, equal widths (residual-ready)
    fixes = {
        "overfitting": ("regularise the critic (and stop at the selected checkpoint)", [
            ("variational information bottleneck (the paper's)", {"critic.vib_size": 16, "critic.vib_weight": 0.01}),
            ("dropout", {"critic.dropout": 0.1}),
            ("L2", {"critic.weight_decay": 1e-4}),
            ("L1", {"critic.l1": 1e-5})]),
        "underfitting": ("add capacity to the critic", [
            ("bigger critic", {"critic.hidden": bigger}),
            ("residual critic", {"critic.residual": True} if len(set(hidden)) == 1
             else {"critic.residual": True, "critic.hidden": [max(hidden)] * len(hidden)}),
            ("DR3", {"critic.dr3_weight": 0.01})]),
    }
    out = []
    for regime in triggered:
        remedy, options = fixes[regime]
        out.append({"problem": regime, "remedy": remedy, "options": [
            {"name": name, "overrides": [f"{k}={_override_value(v)}" for k, v in ov.items()],
             "current": {k: cfg.get(k) for k in ov}} for name, ov in options]})
    return out


@dataclass
class RunAnalysis:
    """One run's result (``result`` is what workflow.json holds) with the curves it came from."""

    run_dir: Path
    curves: Curves
    result: dict
    config: dict


def analyse_run(run_dir: Path, rules: Rules) -> RunAnalysis:
    """Regime, evidence, corrections and the selected checkpoint of one run directory."""
    run_dir = Path(run_dir)
    curves, cfg = read_curves(run_dir), read_config(run_dir)
    q_col = curves.first_logged(Q_COLUMNS)
    if q_col is None and len(curves.epochs) >= MIN_EPOCHS:
        raise OffrlError(_no_curves_message(run_dir, cfg))
    q_col = q_col or Q_COLUMNS[0]
    epochs, q = curves.series(q_col)
    if len(epochs) < MIN_EPOCHS:
        raise OffrlError(f"{run_dir}: {q_col} is logged at {len(epochs)} epoch(s); the workflow needs at least "
                         f"{MIN_EPOCHS}")
    ckpts = saved_checkpoints(run_dir)
    if not ckpts:
        raise OffrlError(f"{run_dir}: no checkpoint to select (no checkpoints/<epoch>/ folder)")

    over = overfitting_evidence(epochs, q, rules)
    over["column"] = q_col
    qbar = float(np.mean(np.abs(smooth(q, rules.smooth)[-_tail_len(len(q), rules.tail):])))
    under: dict[str, Any] = {"q_scale": qbar}
    for key, columns, scale, threshold in (("td", TD_COLUMNS, qbar ** 2, rules.td_level),
                                           ("cql", (M.WF_CQL_REGULARIZER,), qbar, rules.cql_level)):
        col = curves.first_logged(columns)
        t, y = curves.series(col) if col else (np.array([]), np.array([]))
        under[key] = ({"column": col, **stays_large(t, y, scale, threshold, rules)} if len(t) >= MIN_EPOCHS
                      else None)
    under["tested"] = any(under[k] is not None for k in ("td", "cql"))
    under["detected"] = any(under[k] is not None and under[k]["stays_large"] for k in ("td", "cql"))

    triggered = [r for r, hit in (("overfitting", over["detected"]), ("underfitting", under["detected"])) if hit]
    epoch, reason = select_checkpoint(ckpts, over["peak_epoch"] if over["detected"] else None)
    result = {
        "run": run_dir.resolve().name,
        "regime": triggered[0] if triggered else "neither",
        "triggered": triggered,
        "address_first": triggered[0] if len(triggered) > 1 else None,
        "epochs": {"logged": len(epochs), "first": int(epochs[0]), "last": int(epochs[-1])},
        "overfitting": over,
        "underfitting": under,
        "correction": corrections(triggered, cfg),
        "selected": {"epoch": epoch, "checkpoint": f"checkpoints/{epoch}", "reason": reason},
        "checkpoints": ckpts,
        "final": {c: float(curves.series(c)[1][-1]) for c in curves.values
                  if c.startswith("workflow/") and len(curves.series(c)[0])},
        "not_used_for_selection": _success(curves, epoch),
        "rules": asdict(rules),
    }
    return RunAnalysis(run_dir, curves, result, cfg)


def _success(curves: Curves, epoch: int) -> Optional[dict]:
    """eval/success_rate, shown beside the selection, never used by it."""
    t, y = curves.series(M.EVAL_SUCCESS_RATE)
    ok = np.isfinite(y)
    t, y = t[ok], y[ok]
    if not len(t):
        return None
    at = y[t == epoch]
    return {"column": M.EVAL_SUCCESS_RATE, "at_selected": float(at[-1]) if len(at) else None,
            "max": float(y.max()), "max_epoch": int(t[int(np.argmax(y))])}


def score(a: RunAnalysis, column: str, rules: Rules) -> float:
    """Smoothed ``column`` at the selected checkpoint's epoch (linear interpolation between logged epochs)."""
    t, y = a.curves.series(column)
    return float(np.interp(a.result["selected"]["epoch"], t, smooth(y, rules.smooth)))


def rank(analyses: dict[str, RunAnalysis], rules: Rules) -> tuple[list[dict], list[str]]:
    """Ranking rows (module docstring, "Sweeps") and notes."""
    rows = []
    for trial, a in analyses.items():
        col = M.WF_DATASET_Q_VAL if len(a.curves.series(M.WF_DATASET_Q_VAL)[0]) else a.result["overfitting"]["column"]
        s = a.result["not_used_for_selection"]
        rows.append({"trial": trial, "regime": a.result["regime"],
                     "underfitting": "underfitting" in a.result["triggered"],
                     "epoch": a.result["selected"]["epoch"], "score": score(a, col, rules), "score_column": col,
                     "success_rate_not_used": s["at_selected"] if s else None})
    rows.sort(key=lambda r: (r["underfitting"], -r["score"], r["trial"]))
    rows = [{"rank": i, **r} for i, r in enumerate(rows, 1)]
    notes = []
    for key in SCALE_KEYS:
        values = {json.dumps(a.config.get(key)) for a in analyses.values()}
        if len(values) > 1:
            notes.append(f"trials differ in {key} ({', '.join(sorted(values))}): their Q values are on "
                         "different scales, so the score compares them only roughly")
    if len({r["score_column"] for r in rows}) > 1:
        notes.append("some trials log no held-out dataset Q; they are scored by their training dataset Q")
    return rows, notes


# ------------------------------------------------------------------------------------------- output

def plot(a: RunAnalysis) -> bytes:
    """workflow.png: dataset / policy Q, TD error (log scale), CQL regulariser and success rate when logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from offrl.stats.plots import png_bytes

    c, r = a.curves, a.result
    extra = [col for col in (M.WF_CQL_REGULARIZER, M.EVAL_SUCCESS_RATE) if len(c.series(col)[0])]
    fig, axes = plt.subplots(2 + bool(extra), 1, sharex=True, figsize=(8, 3 * (2 + bool(extra))), squeeze=False)
    axes = axes[:, 0]
    for col in (M.WF_DATASET_Q_TRAIN, M.WF_DATASET_Q_VAL, M.WF_POLICY_Q):
        t, y = c.series(col)
        if len(t):
            line, = axes[0].plot(t, y, alpha=0.35)
            axes[0].plot(t, smooth(y, r["rules"]["smooth"]), color=line.get_color(), label=col)
    axes[0].set_ylabel("Q (thin: raw, bold: smoothed)")
    for col in TD_COLUMNS:
        t, y = c.series(col)
        if len(t) and np.any(y > 0):
            axes[1].plot(t[y > 0], y[y > 0], label=col)
            axes[1].set_yscale("log")
    axes[1].set_ylabel("mean squared TD error")
    if extra:
        ax = axes[2]
        t, y = c.series(M.WF_CQL_REGULARIZER)
        if len(t):
            ax.plot(t, y, label=M.WF_CQL_REGULARIZER)
            ax.set_ylabel("CQL gap")
        t, y = c.series(M.EVAL_SUCCESS_RATE)
        if len(t):
            twin = ax.twinx()
            twin.plot(t, y, "k.:", label=f"{M.EVAL_SUCCESS_RATE} (not used for selection)")
            twin.set_ylabel("success rate (not used)")
            twin.legend(loc="lower right", fontsize=7)
    peak, sel = r["overfitting"]["peak_epoch"], r["selected"]["epoch"]
    for ax in axes:
        ax.axvline(peak, color="grey", ls="--", lw=1, label=f"dataset-Q peak (epoch {peak})")
        ax.axvline(sel, color="red", lw=1.5, label=f"selected checkpoint (epoch {sel})")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("epoch")
    fig.suptitle(f"{r['run']}: {' + '.join(r['triggered']) or 'neither overfitting nor underfitting'}")
    fig.tight_layout()
    return png_bytes(fig)


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def report(a: RunAnalysis) -> str:
    """A few human-readable lines."""
    r, o, u = a.result, a.result["overfitting"], a.result["underfitting"]
    lines = [f"run: {a.run_dir}  regime: {r['regime']}"
             + (f" (underfitting too; address {r['address_first']} first)" if r["address_first"] else ""),
             f"  dataset Q ({o['column']}): peak {_fmt(o['peak_q'])} at epoch {o['peak_epoch']}, rose "
             f"{_fmt(o['rise'])} from the start, fell {_fmt(o['drop'])} by the end "
             f"({_fmt(o['drop_over_rise'])} of the rise): {'overfitting' if o['detected'] else 'no overfitting'}"]
    for key, name in (("td", "TD error"), ("cql", "CQL gap")):
        e = u[key]
        if e is not None:
            lines.append(f"  {name} ({e['column']}): level {_fmt(e['level'])} (threshold {_fmt(e['level_threshold'])}),"
                         f" trend {-100 * e['tail_decrease']:+.0f}% over epochs {e['tail_epochs'][0]}-"
                         f"{e['tail_epochs'][1]}, final/first {_fmt(e['final_over_first'])}: "
                         f"{'stays large' if e['stays_large'] else 'fine'}")
    if not u["tested"]:
        lines.append("  underfitting not tested: no TD error or CQL regulariser logged at 3 epochs")
    for fix in r["correction"]:
        lines.append(f"  {fix['problem']} -> {fix['remedy']}:")
        for opt in fix["options"]:
            now = ", ".join(f"{k}={v}" for k, v in opt["current"].items() if v is not None)
            lines.append(f"    {opt['name']}: {' '.join(opt['overrides'])}" + (f"  (this run: {now})" if now else ""))
    lines.append(f"  selected: {a.run_dir / r['selected']['checkpoint']} ({r['selected']['reason']})")
    s = r["not_used_for_selection"]
    if s:
        lines.append(f"  {s['column']} (not used for selection): {_fmt(s['at_selected'])} at the selected epoch, "
                     f"max {_fmt(s['max'])} at epoch {s['max_epoch']}")
    return "\n".join(lines)


def ranking_markdown(rows: list[dict], skipped: dict[str, str]) -> str:
    """The ranking as a markdown table, then the trials not analysed."""
    lines = ["| rank | trial | regime | checkpoint epoch | score | score column | success rate (not used) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        regime = r["regime"] + (" + underfitting" if r["underfitting"] and r["regime"] != "underfitting" else "")
        lines.append(f"| {r['rank']} | {r['trial']} | {regime} | {r['epoch']} | {_fmt(r['score'])} | "
                     f"{r['score_column']} | {_fmt(r['success_rate_not_used'])} |")
    lines += [f"not analysed: {t}: {why}" for t, why in skipped.items()]
    return "\n".join(lines)


def _write(files: dict[Path, bytes]) -> None:
    """Write every file (each through a temp file + rename), after everything was rendered."""
    for path, data in files.items():
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OffrlError(f"cannot write {path}: {e.strerror or e}") from None


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def run_workflow(path: str | os.PathLike, rules: Rules) -> str:
    """``offrl workflow PATH``: analyse a run directory (or rank a sweep folder), write the outputs, return
    the printed report."""
    rules.check()
    root = Path(path)
    if root.is_dir() and (root / "metrics.csv").is_file():
        a = analyse_run(root, rules)
        _write({root / OUTPUTS[0]: _json(a.result), root / OUTPUTS[1]: plot(a)})
        return report(a) + f"\nwrote {', '.join(OUTPUTS)} to {root}"

    from offrl.stats.load import find_runs

    sources = find_runs(root)  # refuses a missing path or a file
    analyses: dict[str, RunAnalysis] = {}
    skipped: dict[str, str] = {}
    for src in sources:
        if src.kind != "offrl":
            skipped[src.trial] = "a Ray Tune trial without an offrl run directory"
            continue
        try:
            analyses[src.trial] = analyse_run(src.path, rules)
        except OffrlError as e:
            skipped[src.trial] = str(e)
    if not analyses:
        first = "".join(f"; {t}: {why}" for t, why in list(skipped.items())[:1])
        raise OffrlError(f"no run under {root} could be analysed ({len(sources)} found; run directories hold "
                         f"config.yaml + metrics.csv){first}")
    rows, notes = rank(analyses, rules)
    for row in rows:
        a = analyses[row["trial"]]
        row["checkpoint"] = os.path.relpath(a.run_dir / a.result["selected"]["checkpoint"], root)
    files = {a.run_dir / OUTPUTS[0]: _json(a.result) for a in analyses.values()}
    files.update({a.run_dir / OUTPUTS[1]: plot(a) for a in analyses.values()})
    summary = {"sweep": root.resolve().name, "ranking_rule": "not underfitting first, then the score (the smoothed "
               "held-out dataset Q at the selected checkpoint's epoch) higher first, then the trial id",
               "ranking": rows, "not_analysed": skipped, "notes": notes, "rules": asdict(rules),
               "trials": {t: a.result for t, a in analyses.items()}}
    files[root / OUTPUTS[0]] = _json(summary)
    _write(files)
    return "\n".join([ranking_markdown(rows, skipped)] + [f"note: {n}" for n in notes]
                     + [f"wrote {OUTPUTS[0]} to {root} and {', '.join(OUTPUTS)} to {len(analyses)} run directories"])
