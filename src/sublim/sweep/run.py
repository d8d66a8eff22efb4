"""Run a sweep: every cell of the grid an idempotent experiment in its own run directory, locally or on Ray.

Layout: ``<out>/sweep.json`` (the spec, the grid, the cells) and ``<out>/cells/<cell>/`` (an ordinary run
directory: stages, results.json, report.html) with a ``_CELL_DONE`` marker written atomically when the cell's
results are complete. Re-running the same sweep skips finished cells and resumes unfinished ones from their
finished stages (the pipeline's stages are atomic), so a cell that is retried after its worker died repeats no
finished work and leaves nothing twice. Every cell is a run in the run registry (``sublim runs ls --sweep NAME``).

Executors: ``local`` (one cell after another in this process) and ``ray`` (each cell a Ray task with
``cpus_per_cell`` CPUs and ``retries`` retries when its worker dies; ``address=None`` starts a local Ray, ``auto`` or
``ray://host:port`` joins a cluster, whose workers must have sublim installed and see ``out`` on a shared disk), and
``submitit`` (each cell a Slurm job when ``srun`` exists, else a local subprocess; ``address`` = ``slurm`` or
``local`` forces one; a job that died is resubmitted). The driver's ``SUBLIM_*`` / ``HF_*`` settings reach every
worker.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sublim.runs import atomic_write_json, hash_obj
from sublim.spec import SpecError
from sublim.sweep.grid import cells, describe, parse_grid

DONE = "_CELL_DONE"
EXECUTORS = ("local", "ray", "submitit")


def plan(spec_path: str | Path, grid_items: Sequence[str], out: str | Path) -> dict[str, Any]:
    """Validate every cell's spec before anything runs and write ``sweep.json``; a directory that already holds
    another sweep (other spec or grid) is refused."""
    from sublim.spec import load_spec

    grid = parse_grid(grid_items)
    cs = cells(grid)
    base = load_spec(spec_path)
    specs = {}
    for c in cs:
        try:
            specs[c.name] = load_spec(spec_path, list(c.overrides)).model_dump(mode="json")
        except SpecError as e:
            raise SpecError(f"sweep cell {c.name}: {e}") from None
    name = f"{base.name}-sweep-{hash_obj({'spec': base.model_dump(mode='json'), 'grid': grid})[:8]}"
    doc = {"name": name, "spec_file": str(spec_path), "spec": base.model_dump(mode="json"), "grid": describe(grid),
           "grid_items": list(grid_items),
           "cells": [{"name": c.name, "dir": f"cells/{c.dirname}", "overrides": list(c.overrides), "spec": specs[c.name]}
                     for c in cs]}
    o = Path(out)
    existing = o / "sweep.json"
    if existing.exists():
        old = json.loads(existing.read_text())
        if old.get("name") != name:
            raise SpecError(f"{o}: holds another sweep ({old.get('name')}); use another --out")
    if len({c.dirname for c in cs}) != len(cs):
        raise SpecError("sweep: two cells map to the same directory name; shorten the grid values")
    atomic_write_json(existing, doc)
    return doc


def run_cell(spec: dict[str, Any], cell_dir: str, sweep: str, cell: str, threads: int = 1) -> dict[str, Any]:
    """One cell, idempotent: skip when its marker exists, else run (resuming finished stages), then mark."""
    import torch

    from sublim.pipeline import run
    from sublim.runindex import key_metrics
    from sublim.spec import ExperimentSpec

    d = Path(cell_dir)
    marker = d / DONE
    if marker.exists():
        return {**json.loads(marker.read_text()), "skipped": True}
    torch.set_num_threads(max(1, threads))
    t0 = time.time()
    res = run(ExperimentSpec.model_validate(spec), d, log=lambda m: None, progress=False, sweep=sweep, cell=cell)
    summary = {"cell": cell, "status": "done", "seconds": time.time() - t0, "pid": os.getpid(),
               "metrics": key_metrics(res)}
    atomic_write_json(marker, summary)
    return summary


def sweep(spec_path: str | Path, grid_items: Sequence[str], out: str | Path, *, executor: str = "local",
          address: str | None = None, cpus_per_cell: int = 1, retries: int = 2,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Plan, run every unfinished cell, and return ``{"name", "cells": {cell: summary}, "failed": [...]}``."""
    if executor not in EXECUTORS:
        raise SpecError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if cpus_per_cell < 1 or retries < 0:
        raise SpecError("--cpus-per-cell must be >= 1 and --retries >= 0")
    doc = plan(spec_path, grid_items, out)
    o = Path(out)
    todo = [c for c in doc["cells"] if not (o / c["dir"] / DONE).exists()]
    log(f"[sweep] {doc['name']}: {len(doc['cells'])} cells, {len(todo)} to run ({executor})")
    results: dict[str, Any] = {c["name"]: {**json.loads((o / c["dir"] / DONE).read_text()), "skipped": True}
                               for c in doc["cells"] if c not in todo}
    failed: list[dict[str, str]] = []
    if executor == "local":
        for c in todo:
            try:
                results[c["name"]] = run_cell(c["spec"], str(o / c["dir"]), doc["name"], c["name"], cpus_per_cell)
                log(f"[sweep] done: {c['name']}")
            except Exception as e:  # noqa: BLE001 - one failed cell must not lose the others
                failed.append({"cell": c["name"], "error": f"{type(e).__name__}: {e}".splitlines()[0]})
                log(f"[sweep] FAILED: {c['name']}: {failed[-1]['error']}")
    elif executor == "ray":
        results.update(_ray(doc, todo, o, address, cpus_per_cell, retries, failed, log))
    else:
        results.update(_submitit(doc, todo, o, address, cpus_per_cell, retries, failed, log))
    status = {"name": doc["name"], "cells": results, "failed": failed,
              "done": sum(1 for c in doc["cells"] if (o / c["dir"] / DONE).exists()), "total": len(doc["cells"])}
    atomic_write_json(o / "sweep-status.json", status)
    return status


def _ray(doc: dict[str, Any], todo: list[dict[str, Any]], o: Path, address: str | None, cpus: int, retries: int,
         failed: list[dict[str, str]], log: Callable[[str], None]) -> dict[str, Any]:
    try:
        import ray
    except ImportError:
        raise SpecError("--executor ray needs Ray: pip install 'sublim[ray]'") from None
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"log_to_driver": False}
        if address is None:  # a local Ray of this machine's CPUs (joining a cluster takes none of these)
            kw.update(num_cpus=os.cpu_count() or 1, include_dashboard=False)
        ray.init(address=address, **kw)
        started = True
    try:
        # the driver's sublim / Hugging Face settings (cache, registry, offline) reach the workers too
        env = {k: v for k, v in os.environ.items() if k.startswith(("SUBLIM_", "HF_"))}
        task = ray.remote(num_cpus=cpus, max_retries=retries)(run_cell).options(runtime_env={"env_vars": env})
        refs = {task.remote(c["spec"], str((o / c["dir"]).resolve()), doc["name"], c["name"], cpus): c["name"]
                for c in todo}
        out: dict[str, Any] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            name = refs[ready[0]]
            try:
                out[name] = ray.get(ready[0])
                log(f"[sweep] done: {name} (pid {out[name]['pid']})")
            except Exception as e:  # noqa: BLE001 - a cell that failed after its retries; the others go on
                failed.append({"cell": name, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
                log(f"[sweep] FAILED: {name}: {failed[-1]['error']}")
        return out
    finally:
        if started:
            ray.shutdown()


def _submitit(doc: dict[str, Any], todo: list[dict[str, Any]], o: Path, cluster: str | None, cpus: int,
              retries: int, failed: list[dict[str, str]], log: Callable[[str], None]) -> dict[str, Any]:
    """Each cell a submitit job: Slurm when ``srun`` is there (``cluster=None``), else a local subprocess
    (``cluster='local'`` forces it); a job that died without a result is resubmitted up to ``retries`` times."""
    try:
        import submitit
    except ImportError:
        raise SpecError("--executor submitit needs submitit: pip install submitit") from None
    ex = submitit.AutoExecutor(folder=str(o / "submitit" / "%j"), cluster=cluster)
    ex.update_parameters(name=doc["name"], cpus_per_task=cpus, timeout_min=24 * 60)
    env = {k: v for k, v in os.environ.items() if k.startswith(("SUBLIM_", "HF_"))}

    def submit(c: dict[str, Any]) -> Any:
        return ex.submit(_with_env, env, c["spec"], str((o / c["dir"]).resolve()), doc["name"], c["name"], cpus)

    jobs = {c["name"]: (c, submit(c), 0) for c in todo}
    out: dict[str, Any] = {}
    while jobs:
        for name, (c, job, tries) in list(jobs.items()):
            if not job.done():
                continue
            del jobs[name]
            try:
                out[name] = job.result()
                log(f"[sweep] done: {name} (job {job.job_id})")
            except submitit.core.utils.UncompletedJobError as e:  # died without a result: try again
                if tries < retries and not isinstance(e, submitit.core.utils.FailedJobError):
                    log(f"[sweep] job {job.job_id} of {name} died; resubmitting ({tries + 1}/{retries})")
                    jobs[name] = (c, submit(c), tries + 1)
                else:
                    failed.append({"cell": name, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
                    log(f"[sweep] FAILED: {name}: {failed[-1]['error']}")
        time.sleep(0.5)
    return out


def _with_env(env: dict[str, str], *args: Any) -> dict[str, Any]:
    os.environ.update(env)
    return run_cell(*args)
