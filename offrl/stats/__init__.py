"""Statistics over run and Tune experiment directories: a tidy DataFrame, comparison tables and plots.

``load_runs(path)`` reads every run under a folder into one DataFrame (a row per trial and step, the
flattened config as columns); ``varying_columns(df)`` names the swept axes; ``offrl.stats.compare.compare(df, metric, by)``
computes IQM / mean / median of final performance, AUC and probability of improvement with stratified
bootstrap intervals (after rliable, Agarwal et al. 2021). No Ray or simulator imports; matplotlib is
imported only by :mod:`offrl.stats.plots`.

The names below are imported on first use, so that ``offrl <any command>`` (which imports
:mod:`offrl.stats.cli` to build its parser) does not pay for pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "offrl.stats.aggregate": ("Interval", "auc", "bootstrap_ci", "iqm", "probability_of_improvement",
                              "probability_of_improvement_ci"),
    # ``compare`` itself is not re-exported: the name is taken by the submodule offrl.stats.compare,
    # which Python binds on the package once imported (use ``from offrl.stats.compare import compare``).
    "offrl.stats.compare": ("Comparison", "default_by"),
    "offrl.stats.load": ("config_columns", "final_values", "find_runs", "load_runs", "metric_columns",
                         "trial_table", "varying_columns"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'offrl.stats' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
