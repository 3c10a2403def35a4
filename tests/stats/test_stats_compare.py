"""offrl.stats.compare on the synthetic sweep, checked against direct computation."""

from __future__ import annotations

import numpy as np
import pytest

from offrl.errors import OffrlError
from offrl.stats.aggregate import bootstrap_ci, iqm
from offrl.stats.compare import compare, learning_curves, match_group
from offrl.stats.load import load_runs

from .conftest import FINAL_BASE, SEEDS, final_value, write_run, write_sweep

REPS = 200


@pytest.fixture
def sweep_df(sweep_dir):
    return load_runs(sweep_dir)


def test_table_matches_direct_computation(sweep_df):
    cmp = compare(sweep_df, by=["a.b", "c.d"], baseline="x,2", reps=REPS, seed=3)
    t = cmp.table.set_index("group")
    assert list(t.index) == ["a.b=x, c.d=1", "a.b=x, c.d=2", "a.b=y, c.d=1", "a.b=y, c.d=2"]
    assert cmp.baseline == "a.b=x, c.d=2" and cmp.task_column == "env.id"
    for (b, d), base in FINAL_BASE.items():
        row = t.loc[f"a.b={b}, c.d={d}"]
        finals = np.array([final_value(b, d, s) for s in SEEDS])  # trial ids sort by seed here
        assert row["trials"] == 3 and row["tasks"] == 1
        assert row["iqm"] == pytest.approx(base + 0.05)        # 3 runs: nothing trimmed, the mean
        assert row["mean"] == pytest.approx(base + 0.05) and row["median"] == pytest.approx(base + 0.05)
        assert row["auc"] == pytest.approx((base + 0.05) / 2)  # linear from 0: half the final value
        lo, hi = bootstrap_ci(finals, iqm, REPS, 3, strata=["Toy-v0"] * 3)[1:]
        assert (row["iqm_lo"], row["iqm_hi"]) == pytest.approx((lo, hi))
        # P(> baseline x,2): groups below it 0, above it 1, itself 0.5
        assert row["poi"] == {0.2: 0.0, 0.4: 0.5, 0.6: 1.0, 0.8: 1.0}[base]
    assert t.loc["a.b=x, c.d=2", "poi_lo"] < 0.5 < t.loc["a.b=x, c.d=2", "poi_hi"]
    # learning curves: the mean of the linear curves on the logged eval steps
    c = cmp.curves[cmp.curves["group"] == "a.b=y, c.d=1"]
    assert c["step"].tolist() == [0, 100, 200, 300, 400]
    np.testing.assert_allclose(c["mean"], 0.65 * c["step"] / 400)
    md = cmp.markdown()
    assert "| a.b | c.d | trials | IQM | mean | median | AUC | P(> baseline) |" in md
    assert "| y | 2 | 3 | 0.85 [" in md and "| x | 2 | 3 | 0.45 [" in md and "baseline |" in md


def test_default_groups_and_determinism(sweep_df):
    a = compare(sweep_df, reps=REPS, seed=0)
    assert a.by == ["a.b", "c.d"] and a.baseline == "a.b=x, c.d=1"
    b = compare(sweep_df, reps=REPS, seed=0)
    assert a.table.equals(b.table) and a.curves.equals(b.curves)
    c = compare(sweep_df, reps=REPS, seed=1)
    assert not a.table.equals(c.table)
    one = compare(sweep_df, by=[], reps=REPS)
    assert one.groups == ["all"] and one.table.loc[0, "trials"] == 12


def test_tasks_are_strata(tmp_path):
    df = load_runs(write_sweep(tmp_path / "multi", env_ids=("Toy-v0", "Toy-v1")))
    cmp = compare(df, reps=REPS)
    assert cmp.by == ["a.b", "c.d"] and cmp.task_column == "env.id"   # env.id varies but is not a group
    assert (cmp.table["tasks"] == 2).all() and (cmp.table["trials"] == 6).all()
    plain = compare(df, reps=REPS, task_column=None)
    assert plain.task_column is None and (plain.table["tasks"] == 1).all()
    with pytest.raises(OffrlError, match="task column 'nope'"):
        compare(df, task_column="nope")


def test_baseline_names(sweep_df):
    cmp = compare(sweep_df, by=["a.b", "c.d"], reps=10)
    keys = [("x", 1), ("x", 2), ("y", 1), ("y", 2)]
    by = ["a.b", "c.d"]
    assert match_group(by, keys, "a.b=y, c.d=1") == 2
    assert match_group(by, keys, "c.d=1,a.b=y") == 2
    assert match_group(by, keys, "y, 1") == 2
    for bad, words in [("c.d=1", "matches 2 groups"), ("z", "matches no group"), ("e.f=1", "not a --by column")]:
        with pytest.raises(OffrlError, match=words):
            match_group(by, keys, bad)
    assert cmp.groups[0] == "a.b=x, c.d=1"


def test_user_mistakes(sweep_df):
    with pytest.raises(OffrlError, match=r"metric 'eval/nope' not found; available: eval/success_rate, rollout/return"):
        compare(sweep_df, metric="eval/nope")
    with pytest.raises(OffrlError, match=r"--by column 'a.c' is not a config column; swept: seed, a.b, c.d"):
        compare(sweep_df, by=["a.c"])
    with pytest.raises(OffrlError, match="baseline group 'q' matches no group"):
        compare(sweep_df, baseline="q")


def test_uneven_trials_are_noted(sweep_dir):
    write_run(sweep_dir / "late", {"seed": 7, "env": {"id": "Toy-v0"}, "a": {"b": "x"}, "c": {"d": 1}},
              [{"step": 200, "eval/success_rate": 0.1}, {"step": 600, "eval/success_rate": 0.9}])
    write_run(sweep_dir / "noeval", {"seed": 8, "env": {"id": "Toy-v0"}, "a": {"b": "x"}, "c": {"d": 1}},
              [{"step": 0, "rollout/return": 1.0}])
    cmp = compare(load_runs(sweep_dir), by=["a.b", "c.d"], reps=REPS)
    row = cmp.table.set_index("group").loc["a.b=x, c.d=1"]
    assert row["trials"] == 4 and row["final_step_max"] == 600
    assert any("never logged eval/success_rate" in n and "noeval" in n for n in cmp.notes)
    assert any("end at different steps (400 to 600)" in n for n in cmp.notes)
    # the curve covers only the steps all four trials cover: 200..400
    c = cmp.curves[cmp.curves["group"] == "a.b=x, c.d=1"]
    assert c["step"].min() == 200 and c["step"].max() == 400


def test_learning_curves_grid():
    grid, v = learning_curves([(np.array([0.0, 10.0]), np.array([0.0, 1.0])),
                               (np.array([0.0, 5.0, 20.0]), np.array([1.0, 1.0, 1.0]))], points=100)
    np.testing.assert_array_equal(grid, [0, 5, 10])
    np.testing.assert_allclose(v, [[0, 0.5, 1], [1, 1, 1]])
    grid, v = learning_curves([(np.arange(500.0), np.arange(500.0))], points=50)
    assert len(grid) == 50 and grid[0] == 0 and grid[-1] == 499
    grid, _ = learning_curves([(np.array([0.0, 1.0]), np.zeros(2)), (np.array([2.0, 3.0]), np.zeros(2))])
    assert grid.size == 0


def test_baseline_start_compares_each_group_with_its_own_first_values(tmp_path):
    """--baseline start: P(> start) pairs a group's final values with its own trials' step-0 values."""
    from offrl.stats.aggregate import probability_of_improvement

    starts = {"up": (0.4, 0.4, 0.4), "down": (0.5, 0.5, 0.5)}
    finals = {"up": (0.6, 0.3, 0.7), "down": (0.2, 0.5, 0.1)}
    for g in starts:
        for seed in SEEDS:
            rows = [{"step": 0, "eval/success_rate": starts[g][seed]},
                    {"step": 100, "eval/success_rate": finals[g][seed]}]
            write_run(tmp_path / f"{g}_s{seed}", {"seed": seed, "algo": g, "run": {"trial": f"{g}_s{seed}"}}, rows)
    cmp = compare(load_runs([tmp_path]), by=["algo"], baseline="start", reps=200)
    table = cmp.table.set_index("group")
    for g in starts:
        want = probability_of_improvement(np.array(finals[g]), np.array(starts[g]))
        assert table.loc[f"algo={g}", "poi"] == pytest.approx(want)
    assert table.loc["algo=up", "poi"] == pytest.approx(2 / 3)
    assert table.loc["algo=down", "poi"] == pytest.approx(0.5 / 3)
    md = cmp.markdown()
    from offrl.cli import main

    assert main(["stats", "compare", str(tmp_path), "--by", "algo", "--baseline", "start", "--reps", "50",
                 "--out", str(tmp_path / "stats")]) == 0  # the CLI writes its tables and plots too
    assert (tmp_path / "stats" / "compare_eval_success_rate_intervals.png").stat().st_size > 0
    assert "own trials" in md
    assert all("| baseline |" not in ln for ln in md.splitlines()[6:])  # no group is the baseline


def test_pairwise_probability_of_improvement_matches_direct_computation(sweep_df):
    from offrl.stats.aggregate import probability_of_improvement_ci

    cmp = compare(sweep_df, by=["a.b", "c.d"], reps=REPS, seed=2, pairwise=True)
    labels = cmp.groups
    assert len(cmp.pairs) == len(labels) * (len(labels) - 1)
    finals = {f"a.b={b}, c.d={d}": np.array([final_value(b, d, s) for s in SEEDS]) for b, d in FINAL_BASE}
    for _, r in cmp.pairs.iterrows():
        want = probability_of_improvement_ci(finals[r["a"]], finals[r["b"]], REPS, 2, ["Toy-v0"] * 3, ["Toy-v0"] * 3)
        assert (r["poi"], r["poi_lo"], r["poi_hi"]) == pytest.approx(want)
    p = cmp.pairs.set_index(["a", "b"])["poi"]
    assert p[("a.b=y, c.d=2", "a.b=x, c.d=1")] == 1.0 and p[("a.b=x, c.d=1", "a.b=y, c.d=2")] == 0.0
    md = cmp.markdown()
    assert "P(row > column)" in md and "| a.b=y, c.d=2 | 1 [1, 1] |" in md
    assert compare(sweep_df, by=["a.b", "c.d"], reps=REPS).pairs is None  # only on request
