"""`offrl stats compare` and `offrl stats runs`, end to end on the synthetic sweep."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from offrl.cli import main
from offrl.stats.aggregate import iqm

from .conftest import FINAL_BASE, SEEDS, final_value

OUTPUTS = ("compare_eval_success_rate.md", "compare_eval_success_rate.csv", "compare_eval_success_rate_trials.csv",
           "compare_eval_success_rate_curves.csv", "compare_eval_success_rate_curves.png",
           "compare_eval_success_rate_intervals.png")


def test_compare_end_to_end(sweep_dir):
    r = run_cli("stats", "compare", str(sweep_dir), "--by", "a.b", "c.d", "--baseline", "a.b=x, c.d=1",
                "--reps", "300", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = sweep_dir / "stats"
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for name in OUTPUTS[-2:]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    md = (out / OUTPUTS[0]).read_text()
    assert md.strip() in r.stdout and f"wrote 6 files to {out}/" in r.stdout
    table = pd.read_csv(out / OUTPUTS[1]).set_index("group")
    assert len(table) == 4
    for (b, d), base in FINAL_BASE.items():
        row = table.loc[f"a.b={b}, c.d={d}"]
        finals = np.array([final_value(b, d, s) for s in SEEDS])
        assert row["a.b"] == b and row["c.d"] == d and row["trials"] == 3
        assert row["iqm"] == pytest.approx(iqm(finals)) and row["mean"] == pytest.approx(finals.mean())
        assert row["median"] == pytest.approx(np.median(finals)) and row["auc"] == pytest.approx(finals.mean() / 2)
        assert row["iqm_lo"] <= row["iqm"] <= row["iqm_hi"]
        assert row["poi"] == (0.5 if base == 0.2 else 1.0)
        assert f"| {b} | {d} | 3 | {iqm(finals):.4g} [" in md
    trials = pd.read_csv(out / OUTPUTS[2])
    assert len(trials) == 12 and set(trials.columns) >= {"trial", "group", "final", "auc", "final_step"}
    assert not (out / "compare_eval_success_rate_pairs.csv").exists()
    # --pairwise: the P(row > column) matrix in the markdown and one CSV row per ordered pair
    r = run_cli("stats", "compare", str(sweep_dir), "--by", "a.b", "c.d", "--reps", "300", "--pairwise", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    pairs = pd.read_csv(out / "compare_eval_success_rate_pairs.csv")
    assert len(pairs) == 12 and set(pairs.columns) >= {"a", "b", "poi", "poi_lo", "poi_hi"}
    assert "P(row > column)" in r.stdout and "wrote 7 files" in r.stdout


def test_a_mistake_is_one_line_and_exit_2(tmp_path):
    r = run_cli("stats", "compare", str(tmp_path / "nowhere"), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"offrl: error: path not found: {tmp_path / 'nowhere'}"
    assert r.stdout == ""


def _main(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse mistakes and --help
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("extra, words", [
    ([], None),  # filled in below: the empty folder
    (["--metric", "eval/nope"], "metric 'eval/nope' not found; available: eval/success_rate, rollout/return"),
    (["--by", "a.b", "e.f"], "--by column 'e.f' is not a config column; swept: seed, a.b, c.d, run.trial; all: seed,"),
    (["--baseline", "z"], "baseline group 'z' matches no group; groups: a.b=x, c.d=1; a.b=x, c.d=2;"),
    (["--reps", "0"], "--reps must be at least 1"),
    (["--task-column", "env.nope"], "task column 'env.nope' is not a config column"),
    (["--reps", "many"], "argument --reps: invalid int value"),
])
def test_user_mistakes_exit_2_without_outputs(capsys, sweep_dir, tmp_path, extra, words):
    path = sweep_dir
    if words is None:
        path = tmp_path / "empty"
        path.mkdir()
        words = f"no runs found under {path}"
    rc, out, err = _main(capsys, "stats", "compare", str(path), *extra)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], err
    assert not (path / "stats").exists()


def test_help_documents_every_option(capsys):
    rc, out, _ = _main(capsys, "stats", "compare", "--help")
    assert rc == 0
    for opt in ("--metric", "--by", "--baseline", "--task-column", "--seed", "--reps", "--out", "--pairwise",
                "EXPERIMENT_DIR",
                "IQM", "P(X > Y)"):
        assert opt in out
    rc, out, _ = _main(capsys, "stats", "--help")
    assert rc == 0 and "compare" in out and "runs" in out


def test_runs_summary_and_out_dir(capsys, sweep_dir, tmp_path):
    rc, out, err = _main(capsys, "stats", "runs", str(sweep_dir), "--csv", str(tmp_path / "tidy.csv"))
    assert rc == 0, err
    assert "12 trials, 108 rows" in out and "  a.b: x, y" in out and "  c.d: 1, 2" in out
    assert "  eval/success_rate: 12" in out
    assert len(pd.read_csv(tmp_path / "tidy.csv")) == 108
    rc, out, err = _main(capsys, "stats", "compare", str(sweep_dir), "--metric", "rollout/return", "--reps", "50",
                         "--out", str(tmp_path / "o"), "--task-column", "none")
    assert rc == 0, err
    assert (tmp_path / "o" / "compare_rollout_return.csv").exists() and not (sweep_dir / "stats").exists()
    assert "no task strata" in out
