"""Sinks from the run registry to the experiment trackers researchers already use: MLflow and Weights & Biases.

The registry (:mod:`sublim.runindex`) stays the source of truth; a sink copies a run's record into a tracker:
params (name, spec hash, host, git revision, sweep and cell), the key metrics (teacher-level ratios, intervals,
p values, gamma), its status and its directory as tags. Exports are idempotent: a run already in the tracker
(found by its ``sublim.dir`` tag in MLflow, by a run id derived from its directory in W&B) is updated, not
duplicated.

- ``sublim runs export --to mlflow [--uri sqlite:///mlflow.db] [RUN ...]`` (``pip install mlflow-skinny
  sqlalchemy alembic``, or ``mlflow``); the URI defaults to ``$MLFLOW_TRACKING_URI``.
- ``sublim runs export --to wandb [--dir DIR] [RUN ...]`` (``pip install wandb``): offline runs under ``DIR``
  (``wandb sync DIR/wandb/offline-run-*`` uploads them later); online when ``$WANDB_MODE`` says so.
- ``$SUBLIM_TRACKERS=mlflow,wandb``: every run is exported when it finishes (a tracker that fails says so
  once on stderr; the run is not failed by its bookkeeping).
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from typing import Any, Literal, cast

SINKS = ("mlflow", "wandb")
_Mode = Literal["online", "offline", "disabled", "shared"]
PROJECT = "sublim"


class TrackerError(RuntimeError):
    """A tracker that is not installed or refused the export; one line."""


def _params(run: dict[str, Any]) -> dict[str, str]:
    keys = ("name", "spec_hash", "host", "git", "sweep", "cell")
    return {k: str(run[k]) for k in keys if run.get(k) is not None}


def _metrics(run: dict[str, Any]) -> dict[str, float]:
    out = {k: float(v) for k, v in (run.get("metrics") or {}).items() if isinstance(v, (int, float))}
    if isinstance(run.get("seconds"), (int, float)):
        out["wall_seconds"] = float(run["seconds"])
    return out


def run_id(run: dict[str, Any]) -> str:
    """A tracker-safe id that is the same for the same run directory on every export."""
    return hashlib.sha256(str(run["dir"]).encode()).hexdigest()[:24]


def to_mlflow(runs: Sequence[dict[str, Any]], uri: str | None = None, experiment: str = PROJECT) -> list[str]:
    """Log ``runs`` (registry rows, :func:`sublim.runindex.get_run`) to MLflow; returns the MLflow run ids."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackerError("the MLflow sink needs mlflow: pip install mlflow-skinny sqlalchemy alembic") from None
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackerError("no MLflow tracking URI: pass --uri (e.g. sqlite:///mlflow.db) or set MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    ids = []
    for run in runs:
        found = client.search_runs([exp_id], filter_string=f"tags.`sublim.id` = '{run_id(run)}'", max_results=1)
        if found:
            rid = found[0].info.run_id
        else:
            rid = client.create_run(exp_id, run_name=str(run["name"]),
                                    tags={"sublim.id": run_id(run), "sublim.dir": str(run["dir"])}).info.run_id
            for pk, pv in _params(run).items():  # params are write-once in MLflow: set when the run is made
                client.log_param(rid, pk, pv)
        client.set_tag(rid, "sublim.status", str(run["status"]))
        if run.get("error"):
            client.set_tag(rid, "sublim.error", str(run["error"])[:500])
        for k, v in _metrics(run).items():
            client.log_metric(rid, k, v)
        status = {"done": "FINISHED", "failed": "FAILED"}.get(str(run["status"]))
        if status is not None:
            client.set_terminated(rid, status=status)
        ids.append(rid)
    return ids


def to_wandb(runs: Sequence[dict[str, Any]], directory: str | None = None, project: str = PROJECT) -> list[str]:
    """Log ``runs`` to Weights & Biases, offline unless ``$WANDB_MODE`` says otherwise; returns the run ids."""
    try:
        import wandb
    except ImportError:
        raise TrackerError("the W&B sink needs wandb: pip install wandb") from None
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode not in ("online", "offline", "disabled", "shared"):
        raise TrackerError(f"WANDB_MODE={mode!r}: want online, offline, disabled or shared")
    ids = []
    for run in runs:
        r = wandb.init(project=project, name=str(run["name"]), id=run_id(run), resume="allow", mode=cast(_Mode, mode),
                       dir=directory, config=_params(run), tags=[str(run["status"])], reinit="create_new")
        r.summary.update({**_metrics(run), "sublim_dir": str(run["dir"]), "sublim_status": str(run["status"])})
        r.finish(exit_code=1 if run["status"] == "failed" else 0)
        ids.append(run_id(run))
    return ids


def export(runs: Sequence[dict[str, Any]], sink: str, **kw: Any) -> list[str]:
    if sink == "mlflow":
        return to_mlflow(runs, **kw)
    if sink == "wandb":
        return to_wandb(runs, **kw)
    raise TrackerError(f"unknown tracker {sink!r}; known: {', '.join(SINKS)}")


def on_finish(run_dir: str) -> None:
    """Export a finished run to the trackers ``$SUBLIM_TRACKERS`` names (bookkeeping: never raises)."""
    names = [s.strip() for s in os.environ.get("SUBLIM_TRACKERS", "").split(",") if s.strip()]
    if not names:
        return
    from sublim.runindex import get_run

    try:
        run = get_run(str(run_dir))
    except Exception as e:  # noqa: BLE001 - bookkeeping only
        print(f"warning: trackers not updated: {e}", file=sys.stderr)
        return
    for name in names:
        try:
            export([run], name)
        except Exception as e:  # noqa: BLE001 - a tracker's failure is not the run's
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"warning: tracker {name} not updated: {first}", file=sys.stderr)
