"""The registry's tracker sinks, for real: MLflow against its local SQLite store, W&B in offline mode (issue 13
item 4). A run is registered (running, then done with key metrics), exported through ``sublim runs export``,
exported again after its metrics changed: one tracker run, updated. Marked ``engine``: the trackers are not in
the default install (CI's engine step installs them)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sublim import runindex
from sublim.cli import app

pytestmark = pytest.mark.engine


def _results(ratio: float) -> dict[str, Any]:
    return {"seconds": 12.5, "teacher_level": {"arms": {"same_base": {
        "effects": {"owl": {"ratio": ratio, "ratio_ci": [ratio - 0.5, ratio + 0.5], "p_perm_greater": 0.01}}}}}}


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    db = tmp_path / "runs.sqlite"
    monkeypatch.setenv("SUBLIM_RUNS_DB", str(db))
    run = tmp_path / "runs" / "owl-demo-abc"
    run.mkdir(parents=True)
    runindex.start(run, "owl-demo", "abc123")
    runindex.finish(run, results=_results(2.0))
    return {"db": db, "run": run}


def test_mlflow_export_is_idempotent(registry: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = CliRunner().invoke(app, ["runs", "export", "--to", "mlflow", "--uri", uri])
    assert r.exit_code == 0, r.output
    runindex.finish(registry["run"], results=_results(3.0))  # the run changed (e.g. resumed and re-analysed)
    r = CliRunner().invoke(app, ["runs", "export", "owl-demo", "--to", "mlflow", "--uri", uri])
    assert r.exit_code == 0, r.output
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sublim")
    assert exp is not None
    found = client.search_runs([exp.experiment_id])
    assert len(found) == 1  # updated, not duplicated
    run = found[0]
    assert run.data.params["name"] == "owl-demo" and run.data.params["spec_hash"] == "abc123"
    assert run.data.metrics["same_base.owl.ratio"] == 3.0 and run.data.metrics["same_base.owl.p"] == 0.01
    assert run.data.tags["sublim.status"] == "done" and run.info.status == "FINISHED"
    hist = client.get_metric_history(run.info.run_id, "same_base.owl.ratio")
    assert [m.value for m in hist] == [2.0, 3.0]


def test_a_missing_uri_is_one_line(registry: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = CliRunner().invoke(app, ["runs", "export", "--to", "mlflow"])
    assert r.exit_code == 2 and "no MLflow tracking URI" in r.output


def test_wandb_offline_export(registry: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    out.mkdir()
    r = CliRunner().invoke(app, ["runs", "export", "--to", "wandb", "--dir", str(out)])
    assert r.exit_code == 0, r.output
    from sublim.trackers import run_id

    rid = run_id(runindex.get_run(str(registry["run"])))
    runs = list((out / "wandb").glob(f"offline-run-*-{rid}"))
    assert len(runs) == 1
    data = _wandb_summary(next(runs[0].glob("*.wandb")))
    for key, value in ((b"same_base.owl.ratio", b"2.0"), (b"sublim_status", b'"done"'), (b"spec_hash", b"abc123")):
        at = data.find(key)
        assert at >= 0 and value in data[at: at + 200], key


def _wandb_summary(path: Path) -> bytes:
    """The offline run file's bytes: W&B 0.31 writes protobuf records that only its Go core reads back, so the
    test looks for the summary's key and JSON value as they are encoded (strings in the record)."""
    return path.read_bytes()
