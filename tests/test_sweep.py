"""Sweeps: the grid, local cells that resume and skip, a real local Ray cluster with a worker killed mid-cell
(nothing lost or duplicated), the registry and the report; bad grids fail before anything runs."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from sublim.spec import SpecError
from sublim.sweep import cells, parse_grid, sweep, sweep_report
from tiny_spec import tiny_spec


def _spec_file(tmp_path: Path, model: Path) -> Path:
    spec = tiny_spec(model, seeds=[0], generation={"n_prompts": 12, "batch_size": 12, "max_new_tokens": 12, "seed": 0},
                     evaluation={"n_questions": 2, "batch_size": 4, "number_prefix": False})
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_grid_parsing() -> None:
    g = parse_grid(["student.lr=1e-3,3e-3", "targets=[owl],[eagle, cat]"])
    assert g == {"student.lr": ["1e-3", "3e-3"], "targets": ["[owl]", "[eagle, cat]"]}
    cs = cells(g)
    assert [c.name for c in cs] == ["student.lr=1e-3,targets=[owl]", "student.lr=1e-3,targets=[eagle, cat]",
                                    "student.lr=3e-3,targets=[owl]", "student.lr=3e-3,targets=[eagle, cat]"]
    assert cs[1].dirname == "student.lr=1e-3,targets=_eagle,_cat_"
    for bad, msg in ((["lr"], "expected KEY=V1,V2"), (["1x=2"], "not a dotted spec key"),
                     (["a=1", "a=2"], "given twice"), (["a=[1,2"], "unbalanced"), (["a=1,1"], "repeated"),
                     (["a=1,,2"], "empty value"), ([], "at least one")):
        with pytest.raises(SpecError, match=msg):
            parse_grid(bad)


def test_local_sweep_resumes_skips_registers_and_reports(tiny_model: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from sublim.runindex import list_runs

    db = tmp_path / "runs.sqlite"
    monkeypatch.setenv("SUBLIM_RUNS_DB", str(db))
    spec = _spec_file(tmp_path, tiny_model)
    out = tmp_path / "sw"
    with pytest.raises(SpecError, match="sweep cell student.lr=-1"):
        sweep(spec, ["student.lr=1e-3,-1"], out, log=lambda m: None)
    assert not (out / "cells").exists()  # validated before anything ran
    st = sweep(spec, ["student.lr=1e-3,3e-3"], out, log=lambda m: None)
    assert st["done"] == st["total"] == 2 and not st["failed"]
    marks = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/_CELL_DONE")}
    again = sweep(spec, ["student.lr=1e-3,3e-3"], out, log=lambda m: None)
    assert all(c["skipped"] for c in again["cells"].values())
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/_CELL_DONE")} == marks
    runs = list_runs(sweep=st["name"], path=db)
    assert len(runs) == 2 and {r["status"] for r in runs} == {"done"} and {r["cell"] for r in runs} == set(st["cells"])
    rep = sweep_report(out)
    assert [c["status"] for c in rep["cells"]] == ["done", "done"]
    assert "same_base.owl.ratio" in rep["metrics"] and Path(rep["html"]).exists()
    with pytest.raises(SpecError, match="holds another sweep"):
        sweep(spec, ["student.lr=1e-4,3e-3"], out, log=lambda m: None)


def _workers_running(fn: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if f"ray::{fn}" in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _kill_one_mid_cell(th: threading.Thread, out: Path, find: Any) -> int | None:
    """Start the sweep thread; SIGKILL the first worker process ``find()`` returns once a cell's stages exist; wait
    for the sweep to end. Returns the killed pid (None if none was caught)."""
    th.start()
    killed = None
    t0 = time.time()
    while killed is None and th.is_alive() and time.time() - t0 < 120:
        busy = find()
        if busy and any(out.glob("cells/*/stages/*")):
            killed = busy[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    th.join(300)
    return killed


@pytest.mark.engine
def test_ray_sweep_survives_a_killed_worker(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the Ray cluster at $SUBLIM_RAY_ADDRESS (CI: `ray start --head --num-cpus 2`), or a local one: a worker
    SIGKILLed while its cell trains; Ray retries the cell, which resumes, and the sweep finishes whole."""
    ray = pytest.importorskip("ray")
    db = tmp_path / "runs.sqlite"
    monkeypatch.setenv("SUBLIM_RUNS_DB", str(db))
    spec = _spec_file(tmp_path, tiny_model)
    out = tmp_path / "sw"
    address = os.environ.get("SUBLIM_RAY_ADDRESS")
    ray.init(address=address, log_to_driver=False, **({} if address else {"num_cpus": 2, "include_dashboard": False}))
    try:
        result: dict = {}
        th = threading.Thread(target=lambda: result.update(
            sweep(spec, ["student.lr=1e-3,3e-3"], out, executor="ray", retries=2, log=lambda m: None)))
        killed = _kill_one_mid_cell(th, out, lambda: _workers_running("run_cell"))
        assert killed is not None, "no worker was caught mid-cell"
    finally:
        ray.shutdown()
    assert result["done"] == result["total"] == 2 and not result["failed"]
    assert all(c["pid"] != killed for c in result["cells"].values())  # the killed cell finished on a new worker
    for d in out.glob("cells/*"):
        res = json.loads((d / "results.json").read_text())
        arms = Counter(e["arm"] for e in res["evaluations"])
        assert arms["treatment"] == 1 and arms["control"] == 1  # one student per arm and seed: nothing twice
    from sublim.runindex import list_runs

    assert {r["status"] for r in list_runs(sweep=result["name"], path=db)} == {"done"}  # the workers saw the env


@pytest.mark.engine
def test_submitit_local_sweep_resubmits_a_killed_job(tiny_model: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's local executor (what runs on Slurm runs the same way): one job SIGKILLed mid-cell is resubmitted
    and resumes; both cells finish, each once."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("SUBLIM_RUNS_DB", str(tmp_path / "runs.sqlite"))
    spec = _spec_file(tmp_path, tiny_model)
    out = tmp_path / "sw"
    result: dict = {}
    th = threading.Thread(target=lambda: result.update(
        sweep(spec, ["student.lr=1e-3,3e-3"], out, executor="submitit", address="local", retries=1,
              log=lambda m: None)))
    killed = _kill_one_mid_cell(th, out, lambda: [int(d.name) for d in Path("/proc").iterdir()
                                                  if d.name.isdigit() and _is_job(d, out)])
    assert killed is not None, "no job was caught mid-cell"
    assert result["done"] == result["total"] == 2 and not result["failed"]
    for d in out.glob("cells/*"):
        arms = Counter(e["arm"] for e in json.loads((d / "results.json").read_text())["evaluations"])
        assert arms["treatment"] == 1 and arms["control"] == 1


def _is_job(d: Path, out: Path) -> bool:
    try:
        cmd = (d / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "submitit" in cmd and str(out) in cmd
