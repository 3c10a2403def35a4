"""Inside a sweep: the Tune trainable that runs one offrl job, and the Tune callbacks that log trials.

A trial's run directory is its Tune trial directory (``<storage>/<experiment>/<trial>/``). When a trial
starts again (a retry after a failure, ``sweep.max_failures``, or ``offrl sweep --resume`` after the
driver died), what its folder holds decides what happens:

* the job finished there (``pretrain_done.json`` / ``finetune_summary.json``): nothing is recomputed;
  the metric rows after Tune's last checkpoint (those a killed driver may not have recorded) are
  reported again from ``metrics.csv``;
* a trial with a Tune checkpoint continues exactly from it (networks, optimizers, step and RNG states,
  and finetuning's replay buffer: ``offrl pretrain --resume`` / ``offrl finetune --resume``);
* otherwise (no checkpoint yet) the job starts again from scratch after the offrl files of the
  interrupted attempt are removed.

Tune's ``result.json`` and ``progress.csv`` keep one row per ``step``: a report whose step is not after
the last logged one replaces the rows it supersedes (:class:`JsonResultLog`, :class:`ProgressCsvLog`),
so a restarted trial never leaves duplicated steps. Every attempt is recorded in ``sweep_trial.json``
(mode, checkpoint step, placement group); the trial's log lines go to ``trial.log``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from ray.air.constants import EXPR_PROGRESS_FILE, EXPR_RESULT_FILE
from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import PopulationBasedTraining

from offrl.platform.sweep import DONE_FILES

STEP = "step"
ATTEMPTS_FILE = "sweep_trial.json"
LOG_FILE = "trial.log"
# what the jobs write into a run directory; removed before a trial starts again from scratch
# (Tune's own files, sweep_trial.json and trial.log stay)
_JOB_FILES = ("config.yaml", "meta.json", "metrics.csv", "eval.json", *DONE_FILES.values())


# ------------------------------------------------------------------------------------------ trainable

def run_trial(config: dict, *, job: str, base: dict, exp_dir: str) -> None:
    """Tune function trainable: run ``offrl <job>`` with the trial's axis values set on ``base``."""
    from ray import tune

    from offrl.config import from_dict
    from offrl.platform.sweep import trial_dict

    exp = Path(exp_dir)
    name = Path(tune.get_context().get_trial_dir()).name
    run_dir = exp / name
    data = trial_dict(base, config)
    data.setdefault("run", {}).update(root=str(exp.parent), experiment=exp.name, trial=name, progress=False)
    cfg = from_dict(data)
    log = _file_log(run_dir / LOG_FILE)

    def report(step: int, row: dict, ckpt: Optional[Path]) -> None:
        metrics = {STEP: int(step), **{k: float(v) for k, v in row.items()}}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None)

    checkpoint = tune.get_checkpoint()
    ckpt_dir = usable_checkpoint(Path(checkpoint.path) if checkpoint is not None else None, run_dir)
    ckpt_step = _checkpoint_step(ckpt_dir)
    donor = _donor(ckpt_dir, run_dir)  # Population Based Training: another trial's checkpoint and a new config
    if donor is None and (run_dir / DONE_FILES[job]).exists():
        mode = "replay"
    elif ckpt_step is not None:
        mode = "resume"
    else:
        mode = "fresh"
    _record_attempt(run_dir, mode, ckpt_step, donor=donor, config=config if donor else None)
    log(f"[offrl] trial {name}: {mode}" + (f" (Tune checkpoint at step {ckpt_step})" if ckpt_step is not None else ""))
    try:
        _run_attempt(job, mode, cfg, run_dir, ckpt_step, ckpt_dir, donor, config, log, report)
    except SystemExit as e:  # Tune stopping or pausing the trial ends the job inside tune.report
        log(f"[offrl] trial {name}: stopped by Tune (SystemExit {e.code})")
        raise
    except BaseException as e:
        log(f"[offrl] trial {name}: {type(e).__name__}: {e}")
        raise
    log(f"[offrl] trial {name}: attempt ended ({mode})")


def _run_attempt(job: str, mode: str, cfg: Any, run_dir: Path, ckpt_step: Optional[int], ckpt_dir: Optional[Path],
                 donor: Optional[str], config: dict, log: Callable[[str], None],
                 report: Callable[[int, dict, Optional[Path]], None]) -> None:
    """One attempt of a trial's job, as :func:`run_trial` chose it (replay / resume / fresh)."""
    name = run_dir.name
    if mode == "replay":
        replay_metrics(run_dir, after=ckpt_step, report=report)
        return
    if mode == "resume":
        from offrl.platform.pretrain import run_pretrain_job

        from offrl.platform.finetune import run_finetune_job

        _rewind_checkpoints(run_dir / "checkpoints", ckpt_step, ckpt_dir, replace=donor is not None)
        if donor is not None:
            (run_dir / DONE_FILES[job]).unlink(missing_ok=True)
            log(f"[offrl] trial {name}: continues from trial {donor}'s checkpoint at step {ckpt_step} with "
                + ", ".join(f"{k}={v}" for k, v in config.items()))
        (run_pretrain_job if job == "pretrain" else run_finetune_job)(cfg, resume=True, log=log, reporter=report)
        return
    clear_run_dir(run_dir)
    if job == "pretrain":
        from offrl.platform.pretrain import run_pretrain_job

        run_pretrain_job(cfg, log=log, reporter=report, exist_ok=True)
    else:
        from offrl.platform.finetune import run_finetune_job

        run_finetune_job(cfg, log=log, reporter=report, exist_ok=True)


def _file_log(path: Path) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(msg, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    return log


def usable_checkpoint(tune_ckpt: Optional[Path], run_dir: Path) -> Optional[Path]:
    """The checkpoint a restarted trial continues from: Tune's, or, when Tune has deleted that copy
    (``sweep.keep_checkpoints``) after its saved experiment state named it, the latest checkpoint of the run
    directory the copy belonged to (this trial's; another trial's under PBT). That one is never older than
    Tune's, and every row up to it was reported (and logged by the sweep's result logs), so continuing there
    neither repeats nor skips a step."""
    if tune_ckpt is None or (tune_ckpt / "training_state" / "state.json").is_file():
        return tune_ckpt
    from offrl.platform.checkpoint import latest_checkpoint

    return latest_checkpoint(tune_ckpt.parent / "checkpoints")


def _checkpoint_step(ckpt_dir: Optional[Path]) -> Optional[int]:
    """The step an offrl checkpoint folder (as reported to Tune) was saved at."""
    if ckpt_dir is None:
        return None
    return int(json.loads((ckpt_dir / "training_state" / "state.json").read_text())["step"])


def _record_attempt(run_dir: Path, mode: str, ckpt_step: Optional[int], donor: Optional[str] = None,
                    config: Optional[dict] = None) -> None:
    """Append this attempt (mode, checkpoint step, placement group; under PBT the trial whose checkpoint it
    continues from and its new config) to ``sweep_trial.json``."""
    import ray

    path = run_dir / ATTEMPTS_FILE
    data = json.loads(path.read_text()) if path.exists() else {"attempts": []}
    pg = ray.util.get_current_placement_group()
    data["attempts"].append({
        "mode": mode, "checkpoint_step": ckpt_step, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pid": os.getpid(), "node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
        "placement_group": pg.id.hex() if pg is not None else None,
        "bundles": pg.bundle_specs if pg is not None else None,
        "capture_child_tasks": ray.get_runtime_context().should_capture_child_tasks_in_placement_group,
        **({"checkpoint_from": donor, "config": config} if donor else {}),
    })
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(data, indent=2))


def clear_run_dir(run_dir: Path) -> None:
    """Remove what an interrupted attempt of a job wrote (Tune's files stay)."""
    for name in _JOB_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for events in run_dir.glob("events.out.tfevents.*"):
        events.unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _rewind_checkpoints(ckpt_root: Path, step: int, tune_ckpt: Path, replace: bool = False) -> None:
    """Make ``step`` the latest offrl checkpoint: newer ones go, a missing one is copied from Tune's
    (``replace``: the one at ``step`` is replaced by Tune's, another trial's under PBT)."""
    from offrl.platform.checkpoint import list_checkpoints

    for p in list_checkpoints(ckpt_root):
        if int(p.name) > step or (replace and int(p.name) == step):
            shutil.rmtree(p, ignore_errors=True)
    if not (ckpt_root / str(step)).exists():
        tmp = ckpt_root / f".{step}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tune_ckpt, tmp)
        tmp.rename(ckpt_root / str(step))


def _donor(ckpt_dir: Optional[Path], run_dir: Path) -> Optional[str]:
    """The name of the trial a checkpoint belongs to when it is not this trial's (PBT's exploit step)."""
    if ckpt_dir is None:
        return None
    ckpt, own = ckpt_dir.resolve(), run_dir.resolve()
    if own in ckpt.parents:
        return None
    # a Tune copy lies in <experiment>/<trial>/checkpoint_NNNNNN; an offrl one in <trial>/checkpoints/<step>
    trial = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return trial.name


def replay_metrics(run_dir: Path, after: Optional[int], report: Callable[[int, dict, Optional[Path]], None]) -> int:
    """Report the rows of a finished run's metrics.csv logged after step ``after`` (all when None).

    The last row carries the run's final checkpoint when there is one. Returns the rows reported.
    """
    from offrl.platform.logger import read_metrics_csv

    _, rows = read_metrics_csv(run_dir / "metrics.csv")  # a malformed row is an OffrlError naming file:line
    todo = []
    for r in rows:
        step = int(float(r.pop(STEP)))
        if after is None or step > after:
            todo.append((step, {k: float(v) for k, v in r.items() if v not in (None, "")}))
    for i, (step, values) in enumerate(todo):
        ckpt = run_dir / "checkpoints" / str(step)
        report(step, values, ckpt if i == len(todo) - 1 and ckpt.is_dir() else None)
    return len(todo)


# ------------------------------------------------------------------------------------------ scheduler

class PBTScheduler(PopulationBasedTraining):
    """Tune's Population Based Training, less one stale decision that can end a trial early.

    In synchronous mode a trial can report the perturbation step and still be saving that checkpoint when
    the last trial of the population arrives and the scheduler exploits it. Pausing a trial that is saving
    makes Tune (2.60, ``TuneController._schedule_trial_stop``) cache a STOP decision for it; the pause cancels
    the save, so nothing consumes the STOP until the trial runs again, from its donor's checkpoint, and saves
    its next checkpoint: Tune then executes the STOP and the trial ends for good after one more step (seen
    in a CI run: metrics 1-3 of 6, no error, the sweep table said "stopped by pbt"). The exploited trial has
    no live actor left, so no cached decision can still belong to it: drop it.
    """

    def _exploit(self, tune_controller: Any, trial: Any, trial_to_clone: Any) -> None:
        super()._exploit(tune_controller, trial, trial_to_clone)
        controller = getattr(tune_controller, "_tune_controller", tune_controller)  # Tune passes a wrapper
        cached = getattr(controller, "_cached_trial_decisions", None)
        if isinstance(cached, dict):
            cached.pop(trial.trial_id, None)


# ------------------------------------------------------------------------------------------ logging

def _num(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _log_file(trial: Any, name: str) -> Path:
    """A sweep log of ``trial`` in its folder of the experiment (the storage path), not in Tune's driver
    staging folder: Tune copies that folder over the experiment's in a background thread, and a driver
    killed during the copy leaves the copied files cut short (an empty ``progress.csv`` after ``--resume``).
    Written here, the logs are only ever appended to or replaced whole, and a half-written last line
    is dropped when the file is opened again (:func:`_drop_cut_line`)."""
    fs = trial.storage.storage_filesystem.type_name
    if fs != "local":
        raise ValueError(f"sweep logs need a storage path on the local filesystem, got a {fs!r} one")
    path = Path(trial.storage.trial_fs_path, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _drop_cut_line(path: Path) -> None:
    """Drop a last line that a killed driver left without its newline (appends would join it to the next row)."""
    if path.exists():
        text = path.read_text(errors="replace")
        if text and not text.endswith("\n"):
            _write_atomic(path, text[:text.rfind("\n") + 1])


class JsonResultLog(JsonLoggerCallback):
    """Tune's result.json with one row per ``step``: a report at a step already logged (a trial that
    restarted from a checkpoint or from scratch) first drops the rows it supersedes. The file lives in the
    trial's experiment folder (:func:`_log_file`); ``params.json`` stays Tune's.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_step: dict = {}

    def log_trial_start(self, trial: Any) -> None:
        if trial in self._trial_files:
            self._trial_files[trial].close()
        trial.init_local_path()
        self.update_config(trial, trial.config)  # params.json and params.pkl, in Tune's staging folder
        path = _log_file(trial, EXPR_RESULT_FILE)
        _drop_cut_line(path)
        steps = [s for s in (_num(row.get(STEP)) for row in self._rows(path)) if s is not None]
        self._last_step[trial] = max(steps) if steps else None
        self._trial_files[trial] = path.open("at")

    @staticmethod
    def _rows(path: Path) -> list[dict]:
        rows = []
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a killed driver
                if isinstance(row, dict):
                    rows.append(row)
        return rows

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if trial not in self._trial_files:
            self.log_trial_start(trial)
        step, last = _num(result.get(STEP)), self._last_step.get(trial)
        if step is not None and last is not None and step <= last:
            path = _log_file(trial, EXPR_RESULT_FILE)
            self._trial_files[trial].close()
            kept = [r for r in self._rows(path) if _num(r.get(STEP)) is None or _num(r.get(STEP)) < step]
            _write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
            self._trial_files[trial] = path.open("at")
        super().log_trial_result(iteration, trial, result)
        if step is not None:
            self._last_step[trial] = step


class ProgressCsvLog(CSVLoggerCallback):
    """Tune's progress.csv with a column for every metric ever reported (Tune's own keeps only the
    first result's keys, and offrl's first rows lack most metrics) and one row per ``step``
    (superseded rows are dropped as in :class:`JsonResultLog`), in the trial's experiment folder
    (:func:`_log_file`)."""

    def __init__(self) -> None:
        super().__init__()
        self._rows: dict = {}
        self._cols: dict = {}
        self._paths: dict = {}

    def _setup_trial(self, trial: Any) -> None:
        path = self._paths[trial] = _log_file(trial, EXPR_PROGRESS_FILE)
        _drop_cut_line(path)
        rows, cols = [], []
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                cols, rows = list(reader.fieldnames or []), [dict(r) for r in reader]
        self._rows[trial], self._cols[trial] = rows, cols

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        from ray.tune.utils import flatten_dict

        if trial not in self._rows:
            self._setup_trial(trial)
        row = flatten_dict({k: v for k, v in result.items() if k != "config"}, delimiter="/")
        rows, cols = self._rows[trial], self._cols[trial]
        path = self._paths[trial]
        step = _num(row.get(STEP))
        rewrite = not path.exists()
        if step is not None:
            kept = [r for r in rows if _num(r.get(STEP)) is None or _num(r.get(STEP)) < step]
            rewrite |= len(kept) != len(rows)
            rows[:] = kept
        new = [k for k in row if k not in cols]
        cols += new
        rows.append(row)
        if rewrite or new:
            import io

            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
            _write_atomic(path, buf.getvalue())
        else:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=cols).writerow(row)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        self._rows.pop(trial, None)
        self._cols.pop(trial, None)
        self._paths.pop(trial, None)


class SweepProgress(Callback):
    """One line per trial event (start, finish, retry, failure) and a status line every minute."""

    def __init__(self, metric: str, mode: str = "max", every_s: float = 60.0) -> None:
        self.metric, self.mode, self.every_s = metric, mode, every_s
        self._values: dict = {}
        self._t0 = time.time()
        self._last = 0.0

    def setup(self, **info: Any) -> None:
        self._t0 = self._last = time.time()

    def _say(self, msg: str) -> None:
        s = int(time.time() - self._t0)
        print(f"[sweep {s // 60:d}m{s % 60:02d}s] {msg}", flush=True)

    @staticmethod
    def _counts(trials: list, ended: Any = None, status: str = "TERMINATED") -> str:
        """Trial counts by status; ``ended`` counts as ``status`` (callbacks run before Tune updates it)."""
        c = Counter(status if t is ended else t.status for t in trials)
        return (f"{c.get('RUNNING', 0)} running, {c.get('TERMINATED', 0)} finished, {c.get('ERROR', 0)} failed, "
                f"{c.get('PENDING', 0) + c.get('PAUSED', 0)} pending")

    def on_step(self, iteration: int, trials: list, **info: Any) -> None:
        if time.time() - self._last >= self.every_s:
            self._last = time.time()
            self._say(self._counts(trials))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(f"started  {trial}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        v = _num(result.get(self.metric))
        if v is not None and not math.isnan(v):
            self._values[trial.trial_id] = (result.get(STEP), v)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        step, v = self._values.get(trial.trial_id, (None, None))
        shown = f"  {self.metric}={v:.3g} at step {step}" if v is not None else ""
        self._say(f"finished {trial}{shown}  ({self._counts(trials, trial)})")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(f"retrying {trial} after a failure (see {trial.path}/error.txt)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(f"FAILED   {trial} (see {trial.path}/error.txt)  ({self._counts(trials, trial, 'ERROR')})")
