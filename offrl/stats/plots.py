"""PNG figures of a :class:`offrl.stats.compare.Comparison` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.figure import Figure  # noqa: E402

from offrl.stats.compare import FINAL_STATS, GROUP, START, STEP, Comparison, format_value  # noqa: E402

_LINESTYLES = ("-", "--", "-.", ":")
_MAX_LABEL = 40  # characters of a group's name in a legend or tick label


def _short_labels(cmp: Comparison) -> dict[str, str]:
    """Group label -> its values only (``gae, ppo``); the column names go in the legend title / axis label."""
    if not cmp.by:
        return {g: g for g in cmp.groups}
    short = {row[GROUP]: ", ".join(format_value(row[c]) for c in cmp.by) for _, row in cmp.table.iterrows()}
    return {g: s if len(s) <= _MAX_LABEL else s[:_MAX_LABEL - 3] + "..." for g, s in short.items()}


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def learning_curves_figure(cmp: Comparison) -> Figure:
    """Mean curve per group over the common step grid with its bootstrap band."""
    short = _short_labels(cmp)
    groups = cmp.groups
    fig, ax = plt.subplots(figsize=(8.5 if len(groups) <= 6 else 10.5, 5.0), layout="constrained")
    for i, (g, color) in enumerate(zip(groups, _colors(len(groups)))):
        c = cmp.curves[cmp.curves[GROUP] == g] if not cmp.curves.empty else cmp.curves
        if c.empty:
            continue
        n = int(c["trials"].iloc[0])
        ax.plot(c[STEP], c["mean"], color=color, ls=_LINESTYLES[(i // 10) % len(_LINESTYLES)], lw=2,
                label=f"{short[g]} (n={n})")
        ax.fill_between(c[STEP], c["lo"], c["hi"], color=color, alpha=0.18, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel(cmp.metric)
    ax.set_title(f"{cmp.metric}: mean over trials, {cmp.level:.0%} bootstrap CI")
    ax.grid(alpha=0.3)
    title = " / ".join(cmp.by) if cmp.by else None
    if len(groups) <= 6:
        ax.legend(title=title, fontsize=9, title_fontsize=9)
    else:
        ax.legend(title=title, fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def intervals_figure(cmp: Comparison) -> Figure:
    """Horizontal interval plot per group: IQM, median and mean of the final values, and P(> baseline)."""
    short = _short_labels(cmp)
    t = cmp.table
    y = list(range(len(t)))[::-1]  # first group on top
    colors = _colors(len(t))
    panels = [(key, name) for key, name, _ in FINAL_STATS] + [("poi", "P(> baseline)")]
    fig, axes = plt.subplots(1, len(panels), sharey=True, layout="constrained",
                             figsize=(3.0 * len(panels) + 1.5, 0.45 * len(t) + 1.6))
    for ax, (key, name) in zip(axes, panels):
        for yi, (_, row), color in zip(y, t.iterrows(), colors):
            if key == "poi" and row[GROUP] == cmp.baseline and cmp.baseline != START:
                ax.text(0.5, yi, "baseline", ha="center", va="center", fontsize=9, color="gray")
                continue
            ax.plot([row[key + "_lo"], row[key + "_hi"]], [yi, yi], color=color, lw=9, alpha=0.55,
                    solid_capstyle="butt")
            ax.plot([row[key]], [yi], marker="|", color="black", ms=14, mew=2)
        base = "start" if cmp.baseline == START else short[cmp.baseline]
        ax.set_title(name if key != "poi" else f"P(> {base})", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_ylim(-0.7, len(t) - 0.3)
        if key == "poi":
            ax.axvline(0.5, color="gray", ls="--", lw=1)
            ax.set_xlim(-0.02, 1.02)
    axes[0].set_yticks(y, [short[g] for g in t[GROUP]])
    axes[0].set_ylabel(" / ".join(cmp.by) if cmp.by else "")
    fig.suptitle(f"{cmp.metric}: final value per trial, {cmp.level:.0%} bootstrap CIs "
                 f"({len(cmp.trials)} trials)", fontsize=11)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG bytes and close it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    return buf.getvalue()
