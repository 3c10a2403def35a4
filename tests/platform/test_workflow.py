"""`offrl workflow` on synthetic run directories: regimes, the selected checkpoint, sweep ranking, bad inputs.

Each run directory is written by hand: metrics.csv as MetricLogger writes it (step = epoch), empty
``checkpoints/<epoch>/`` folders and a minimal config.yaml. No Ray, no simulator.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from offrl import metrics as M
from offrl.cli import main
from offrl.platform.workflow import Rules, analyse_run, corrections, smooth, stays_large

EPOCHS = np.arange(1, 31)


def write_run(run: Path, columns: dict[str, np.ndarray], checkpoints=(10, 20, 30), algo="iql",
              cells: dict[tuple[int, str], str] | None = None) -> Path:
    """A run directory: config.yaml, metrics.csv (one row per epoch) and empty checkpoints/<epoch>/ folders."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"pretrain": {"algo": algo, "gamma": 0.8},
                                                     "critic": {"hidden": [256, 256]}}))
    n = len(next(iter(columns.values()))) if columns else 0
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *columns])
        for i in range(n):
            w.writerow([i + 1, *(repr(float(v[i])) for v in columns.values())])
    if cells:  # literal cells, e.g. "nan" at (epoch, column)
        header, *rows = list(csv.reader(open(run / "metrics.csv")))
        for (epoch, col), cell in cells.items():
            rows[epoch - 1][header.index(col)] = cell
        with open(run / "metrics.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    for e in checkpoints:
        (run / "checkpoints" / str(e)).mkdir(parents=True)
    (run / "checkpoints" / "best" / "3").mkdir(parents=True)  # never selectable
    return run


def _noise(seed: int, scale: float) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(len(EPOCHS))


def overfit_curves(peak=12, top=5.0, end=2.0) -> dict[str, np.ndarray]:
    """Dataset Q rises linearly to ``top`` at ``peak``, then falls to ``end``; TD error falls (fits fine)."""
    q = np.where(EPOCHS <= peak, top * EPOCHS / peak, top - (top - end) * (EPOCHS - peak) / (30 - peak))
    q = q + _noise(0, 0.03)
    return {M.WF_DATASET_Q_TRAIN: q, M.WF_DATASET_Q_VAL: q - 0.5, M.WF_POLICY_Q: q + 0.3,
            M.WF_TD_ERROR_TRAIN: 0.5 * np.exp(-EPOCHS / 5) + 0.01, M.WF_TD_ERROR_VAL: 0.6 * np.exp(-EPOCHS / 5) + 0.02}


def healthy_curves(top=5.0, val_shift=-0.5) -> dict[str, np.ndarray]:
    """Dataset Q rises and plateaus at ``top``; TD error falls by two orders of magnitude."""
    q = top * (1 - np.exp(-EPOCHS / 5)) + _noise(1, 0.03)
    return {M.WF_DATASET_Q_TRAIN: q, M.WF_DATASET_Q_VAL: q + val_shift, M.WF_POLICY_Q: q + 0.2,
            M.WF_TD_ERROR_TRAIN: 1.0 * np.exp(-EPOCHS / 6) + 0.005, M.WF_TD_ERROR_VAL: 1.2 * np.exp(-EPOCHS / 6) + 0.01}


def underfit_curves(val=6.0) -> dict[str, np.ndarray]:
    """TD error flat at 3 (Q about 2: level 3 / 4 = 0.75 >> 0.1); dataset Q creeps up."""
    q = 1.5 + 0.5 * EPOCHS / 30 + _noise(2, 0.02)
    return {M.WF_DATASET_Q_TRAIN: q, M.WF_DATASET_Q_VAL: q - 2.0 + val, M.WF_TD_ERROR_TRAIN: 3.0 + _noise(3, 0.1),
            M.WF_TD_ERROR_VAL: 3.5 + _noise(4, 0.1)}


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse mistakes and --help
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _result(run: Path) -> dict:
    return json.loads((run / "workflow.json").read_text())


# --------------------------------------------------------------------------------------------- math

def test_smooth_by_hand():
    # window 3, ends mirrored: [9 | 0 0 9 0 0 | 0] -> medians of (9,0,0), (0,0,9), (0,9,0), (9,0,0), (0,0,0) = 0s;
    # a one-epoch spike, even at the first epoch, is gone
    assert smooth([0, 0, 9, 0, 0], 3).tolist() == [0, 0, 0, 0, 0]
    assert smooth([9, 0, 0, 0, 0], 3).tolist() == [0, 0, 0, 0, 0]
    # monotone: [2 | 1 2 3 4 10 | 4] -> (2,1,2)=2, (1,2,3)=2, (2,3,4)=3, (3,4,10)=4, (4,10,4)=4
    assert smooth([1, 2, 3, 4, 10], 3).tolist() == [2, 2, 3, 4, 4]
    assert smooth([1, 2, 3], 1).tolist() == [1, 2, 3]
    # a window longer than the curve is capped (4 epochs -> 3): [5 | 1 5 2 7 | 2] -> 5, 2, 5, 2
    assert smooth([1, 5, 2, 7], 99).tolist() == [5, 2, 5, 2]


def test_stays_large_by_hand():
    # tail = last 2 of 4 epochs: (3, 2.0), (4, 1.0): slope -1, fall across the tail 1 / mean 1.5 = 2/3;
    # level = 1.0 / (Q scale 2)
    e = stays_large(np.array([1, 2, 3, 4]), np.array([4.0, 3.0, 2.0, 1.0]), 2.0, 0.1, Rules(smooth=1, tail=0.5))
    assert e["tail_epochs"] == [3, 4] and e["tail_decrease"] == pytest.approx(2 / 3)
    assert e["level"] == pytest.approx(0.5) and e["final_over_first"] == pytest.approx(0.25)
    assert not e["stays_large"]  # large, but still falling fast
    flat = stays_large(np.array([1, 2, 3, 4]), np.array([1.0, 1.0, 1.0, 1.0]), 2.0, 0.1, Rules(smooth=1))
    assert flat["tail_decrease"] == pytest.approx(0) and flat["stays_large"]


# ------------------------------------------------------------------------------------------- regimes

@pytest.mark.parametrize("checkpoints, epoch, where", [((10, 12, 20, 30), 12, "at the dataset-Q peak"),
                                                       ((10, 14, 20, 30), 10, "2 epochs before it"),
                                                       ((15, 20, 30), 15, "3 epochs after it")])
def test_overfitting_selects_the_peak_checkpoint(tmp_path, capsys, checkpoints, epoch, where):
    run = write_run(tmp_path / "run", overfit_curves(peak=12), checkpoints=checkpoints)
    rc, out, err = _cli(capsys, "workflow", str(run))
    assert rc == 0, err
    r = _result(run)
    assert r["regime"] == "overfitting" and r["triggered"] == ["overfitting"]
    o = r["overfitting"]
    # the median keeps the peak at epoch 12 (its value ~ q(13) = 5 - 3/18) and the mirrored end is ~ q(29) =
    # 2 + 3/18: drop ~ 2.67, rise ~ 4.8 - q(2) ~ 4
    assert o["column"] == M.WF_DATASET_Q_TRAIN and o["peak_epoch"] == 12
    assert o["drop"] == pytest.approx(2.67, abs=0.15) and o["drop_over_rise"] == pytest.approx(0.66, abs=0.05)
    assert r["selected"]["epoch"] == epoch and r["selected"]["checkpoint"] == f"checkpoints/{epoch}"
    assert where in r["selected"]["reason"]
    assert r["correction"][0]["problem"] == "overfitting"
    assert "critic.vib_size=16" in out and f"selected: {run / 'checkpoints' / str(epoch)}" in out
    assert (run / "workflow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_underfitting_selects_the_last_checkpoint(tmp_path, capsys):
    run = write_run(tmp_path / "run", underfit_curves())
    rc, out, err = _cli(capsys, "workflow", str(run))
    assert rc == 0, err
    r = _result(run)
    assert r["regime"] == "underfitting" and not r["overfitting"]["detected"]
    td = r["underfitting"]["td"]
    assert td["column"] == M.WF_TD_ERROR_TRAIN and td["stays_large"] and td["level"] > 0.5
    assert td["final_over_first"] == pytest.approx(1, abs=0.1) and td["tail_decrease"] < 0.2
    assert r["selected"]["epoch"] == 30 and "last checkpoint" in r["selected"]["reason"]
    assert [o["name"] for o in r["correction"][0]["options"]] == ["bigger critic", "residual critic", "DR3"]
    assert "critic.hidden=[512,512,512]" in out


def test_healthy_run_is_neither_and_one_spike_makes_no_peak(tmp_path, capsys):
    curves = healthy_curves()
    curves[M.WF_DATASET_Q_TRAIN][14] += 3.0  # one noisy epoch mid-way
    run = write_run(tmp_path / "run", curves)
    rc, out, err = _cli(capsys, "workflow", str(run))
    assert rc == 0, err
    r = _result(run)
    assert r["regime"] == "neither" and r["triggered"] == [] and r["correction"] == []
    assert r["overfitting"]["drop"] < 0.1 and r["underfitting"]["td"]["level"] < 1e-3
    assert r["selected"]["epoch"] == 30 and r["checkpoints"] == [10, 20, 30]
    assert "regime: neither" in out


def test_both_regimes_address_overfitting_first(tmp_path):
    curves = overfit_curves()
    curves[M.WF_TD_ERROR_TRAIN] = 20.0 + _noise(5, 0.2)  # 20 / ~3^2 >> 0.1, flat
    r = analyse_run(write_run(tmp_path / "run", curves, checkpoints=(12, 30)), Rules()).result
    assert r["triggered"] == ["overfitting", "underfitting"]
    assert r["regime"] == "overfitting" and r["address_first"] == "overfitting"
    assert [c["problem"] for c in r["correction"]] == ["overfitting", "underfitting"]
    assert r["selected"]["epoch"] == 12


def test_cql_gap_that_stays_large_is_underfitting(tmp_path):
    curves = healthy_curves()
    curves[M.WF_CQL_REGULARIZER] = 8.0 + _noise(6, 0.1)  # 8 / mean |Q| ~ 5 = 1.6 >= 1.0, flat
    curves[M.EVAL_SUCCESS_RATE] = np.linspace(0, 0.9, 30)
    r = analyse_run(write_run(tmp_path / "run", curves, algo="cql"), Rules()).result
    assert r["regime"] == "underfitting" and not r["underfitting"]["td"]["stays_large"]
    assert r["underfitting"]["cql"]["stays_large"] and r["underfitting"]["cql"]["level"] > 1.0
    assert r["not_used_for_selection"]["at_selected"] == pytest.approx(0.9)  # shown, not used


def test_dataset_q_val_is_the_fallback_and_thresholds_are_honoured(tmp_path):
    curves = overfit_curves()
    curves = {M.WF_DATASET_Q_VAL: curves[M.WF_DATASET_Q_VAL], M.WF_TD_ERROR_VAL: curves[M.WF_TD_ERROR_VAL]}
    run = write_run(tmp_path / "run", curves)
    r = analyse_run(run, Rules()).result
    assert r["overfitting"]["column"] == M.WF_DATASET_Q_VAL and r["regime"] == "overfitting"
    assert r["underfitting"]["td"]["column"] == M.WF_TD_ERROR_VAL and r["underfitting"]["cql"] is None
    # the fall is ~0.66 x the rise: a stricter --drop-fraction makes it no overfitting
    assert analyse_run(run, Rules(drop_fraction=0.8)).result["regime"] == "neither"


def test_suggested_overrides_are_valid_config(tmp_path):
    from offrl.config import load_config

    cfg = {"critic.hidden": "[64, 128]"}
    for fix in corrections(["overfitting", "underfitting"], cfg):
        for option in fix["options"]:
            load_config(None, option["overrides"])  # every key exists and every value validates
    residual = corrections(["underfitting"], cfg)[0]["options"][1]["overrides"]
    assert residual == ["critic.residual=true", "critic.hidden=[128,128]"]


# --------------------------------------------------------------------------------------------- sweeps

def test_sweep_is_ranked(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_run(sweep / "healthy", healthy_curves(top=5.0, val_shift=-0.5))           # val Q 4.5 at epoch 30
    write_run(sweep / "overfit", overfit_curves(top=5.0), checkpoints=(12, 30))     # val Q 4.5 - 1.0... at 12
    write_run(sweep / "underfit", underfit_curves(val=6.0))                          # highest val Q, but underfits
    write_run(sweep / "bc_only", {M.TRAIN_LOSS: np.ones(30)}, algo="bc")
    rc, out, err = _cli(capsys, "workflow", str(sweep))
    assert rc == 0, err
    s = _result(sweep)
    ranking = [(r["trial"], r["regime"], r["epoch"]) for r in s["ranking"]]
    assert ranking == [("healthy", "neither", 30), ("overfit", "overfitting", 12), ("underfit", "underfitting", 30)]
    assert [r["rank"] for r in s["ranking"]] == [1, 2, 3]
    scores = {r["trial"]: r["score"] for r in s["ranking"]}
    assert scores["healthy"] == pytest.approx(4.5, abs=0.1) and scores["overfit"] == pytest.approx(4.5, abs=0.3)
    assert scores["underfit"] > scores["healthy"]  # ranked last anyway: it underfits
    assert {r["score_column"] for r in s["ranking"]} == {M.WF_DATASET_Q_VAL}
    assert s["ranking"][1]["checkpoint"] == "overfit/checkpoints/12"
    assert "pretrain.algo=bc" in s["not_analysed"]["bc_only"] and set(s["trials"]) == {"healthy", "overfit", "underfit"}
    assert "| 1 | healthy | neither | 30 |" in out and "not analysed: bc_only:" in out
    for t in ("healthy", "overfit", "underfit"):
        assert _result(sweep / t)["run"] == t and (sweep / t / "workflow.png").exists()
    assert not (sweep / "bc_only" / "workflow.json").exists()


def test_sweep_notes_trials_on_different_q_scales(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_run(sweep / "a", healthy_curves())
    write_run(sweep / "b", healthy_curves(top=4.0), algo="cql")
    rc, out, err = _cli(capsys, "workflow", str(sweep))
    assert rc == 0, err
    assert [r["trial"] for r in _result(sweep)["ranking"]] == ["a", "b"]
    assert "note: trials differ in pretrain.algo" in out


# ----------------------------------------------------------------------------------------- bad inputs

def _one_error_line(rc: int, out: str, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("offrl: error: "), (rc, err)
    assert "Traceback" not in err and out == ""
    return lines[0]


def _bad_nonfinite(tmp_path):
    return write_run(tmp_path / "run", healthy_curves(), cells={(7, M.WF_TD_ERROR_TRAIN): "nan"})


def _bad_corrupt(tmp_path):
    run = write_run(tmp_path / "run", healthy_curves())
    with open(run / "metrics.csv", "a") as f:
        f.write("31,1.0\n")
    return run


@pytest.mark.parametrize("make, argv, expected", [
    (lambda p: p / "nowhere", [], "path not found: "),
    (lambda p: write_run(p / "run", {M.TRAIN_LOSS: np.ones(30)}, algo="bc"), [],
     "has no workflow curves (workflow/dataset_q_train, workflow/dataset_q_val missing or empty); they are logged "
     "by pretrain.algo values that train critics (critic_mc, iql"),
    (lambda p: write_run(p / "run", {k: v[:2] for k, v in healthy_curves().items()}), [],
     "workflow/dataset_q_train is logged at 2 epoch(s); the workflow needs at least 3"),
    (_bad_corrupt, [], "metrics.csv:32: 2 cells but the header has 6 columns"),
    (lambda p: write_run(p / "run", healthy_curves(), checkpoints=()), [], "no checkpoint to select"),
    (_bad_nonfinite, [], "column 'workflow/td_error_train' is nan at epoch 7"),
    (lambda p: write_run(p / "run", healthy_curves()), ["--drop-fraction", "-0.1"],
     "--drop-fraction must be a finite number >= 0, got -0.1"),
    (lambda p: write_run(p / "run", healthy_curves()), ["--smooth", "4"], "--smooth must be an odd number"),
    (lambda p: write_run(p / "run", healthy_curves()), ["--tail", "0"], "--tail must be a fraction in (0, 1]"),
    (lambda p: write_run(p / "sweep" / "bc", {M.TRAIN_LOSS: np.ones(30)}, algo="bc").parent, [],
     "could be analysed (1 found; run directories hold config.yaml + metrics.csv); bc: "),
], ids=["missing", "bc_only", "two_epochs", "corrupt", "no_checkpoints", "nan", "negative", "even_smooth",
        "tail", "sweep_nothing"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, make, argv, expected):
    path = make(tmp_path)
    line = _one_error_line(*_cli(capsys, "workflow", str(path), *argv))
    assert expected in line
    assert not list(tmp_path.rglob("workflow.*")) and not list(tmp_path.rglob(".workflow*"))


def test_help_explains_every_option(capsys):
    rc, out, _ = _cli(capsys, "workflow", "--help")
    assert rc == 0
    for option in ("--smooth", "--drop-fraction", "--min-drop", "--td-level", "--td-decrease", "--cql-level",
                   "--tail"):
        assert option in out
    text = " ".join(out.split())  # argparse wraps lines
    assert text.count("(default:") == 7 and "overfitting is addressed first" in text


def test_smoke_as_users_run_it(tmp_path):
    from conftest import run_cli

    run = write_run(tmp_path / "run", healthy_curves())
    r = run_cli("workflow", str(run), "--smooth", "5", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "regime: neither" in r.stdout and _result(run)["rules"]["smooth"] == 5
