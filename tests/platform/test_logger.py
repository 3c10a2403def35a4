import csv

import pytest

from offrl import metrics as M
from offrl.platform.logger import MetricLogger


def test_csv_and_tensorboard(tmp_path):
    log = MetricLogger(tmp_path)
    log.log(1, {M.TRAIN_LOSS: 1.5})
    log.log(2, {M.TRAIN_LOSS: 1.0, M.EVAL_SUCCESS_RATE: 0.25})  # a new column widens the table
    log.log(3, {M.TRAIN_LOSS: 0.5})
    log.close()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[1][M.EVAL_SUCCESS_RATE] == "0.25" and rows[0][M.EVAL_SUCCESS_RATE] == ""
    assert list(tmp_path.glob("events.out.tfevents.*"))
    # resuming appends to the same table and can drop rows past the checkpoint
    log2 = MetricLogger(tmp_path, tensorboard=False)
    log2.truncate_after(2)
    log2.log(3, {M.TRAIN_LOSS: 0.4})
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r[M.TRAIN_LOSS] for r in rows] == ["1.5", "1.0", "0.4"]


def test_undeclared_metric_is_refused(tmp_path):
    log = MetricLogger(tmp_path, tensorboard=False)
    with pytest.raises(KeyError, match="not declared"):
        log.log(0, {"loss": 1.0})


def test_metric_names_are_namespaced():
    assert all("/" in m for m in M.ALL)
    assert M.EVAL_SUCCESS_RATE == "eval/success_rate" and M.REROLLOUT_SPS == "time/rerollout_sps"
