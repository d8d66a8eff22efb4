"""The run registry: an SQLite index of every experiment run (spec hash, status, key metrics, paths).

``sublim run`` (and the API's :func:`sublim.pipeline.run`) registers a run when it starts (status ``running``)
and updates it when it ends (``done`` with its key metrics, or ``failed`` with the error's first line). The
index lives in ``$SUBLIM_RUNS_DB`` or ``<cache>/runs.sqlite``; a run is keyed by its directory's absolute path, so
a resumed run updates its own row. ``sublim runs ls|show|compare|index`` read it; ``index`` (re)adds finished run
directories that were made elsewhere or before the index existed (from their ``results.json``).

The registry is bookkeeping, never a reason for an experiment to fail: if the database cannot be written (a
read-only disk, a lock held too long) the run goes on and says so once.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    dir TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    seconds REAL,
    host TEXT,
    git TEXT,
    sweep TEXT,
    cell TEXT,
    error TEXT,
    metrics TEXT NOT NULL DEFAULT '{}'
)
"""
STATUSES = ("running", "done", "failed")


class RegistryError(ValueError):
    """A bad registry query (unknown run, ambiguous prefix, unreadable database); the message is one line."""


def db_path() -> Path:
    env = os.environ.get("SUBLIM_RUNS_DB")
    if env:
        return Path(env)
    from sublim.models import cache_dir

    return cache_dir() / "runs.sqlite"


@contextmanager
def connect(path: str | Path | None = None) -> Iterator[sqlite3.Connection]:
    p = Path(path) if path is not None else db_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(p, timeout=30)
    try:
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(SCHEMA)
        yield con
        con.commit()
    finally:
        con.close()


def key_metrics(results: dict[str, Any]) -> dict[str, float | str | None]:
    """A run's headline numbers, flat: per arm and target the teacher-level ratio, its interval and exact p;
    per arm with several targets gamma, its interval and the permutation p; the run's seconds."""
    out: dict[str, float | str | None] = {}

    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None

    for arm, a in (results.get("teacher_level") or {}).get("arms", {}).items():
        for target, e in (a.get("effects") or {}).items():
            out[f"{arm}.{target}.ratio"] = num(e.get("ratio"))
            ci = e.get("ratio_ci") or [None, None]
            out[f"{arm}.{target}.ratio_lo"], out[f"{arm}.{target}.ratio_hi"] = num(ci[0]), num(ci[1])
            out[f"{arm}.{target}.p"] = num(e.get("p_perm_greater", e.get("p_perm")))
        c = a.get("confusion")
        if c:
            out[f"{arm}.gamma"] = num(c.get("gamma"))
            gci = c.get("gamma_ci") or [None, None]
            out[f"{arm}.gamma_lo"], out[f"{arm}.gamma_hi"] = num(gci[0]), num(gci[1])
            out[f"{arm}.gamma_p"] = num(c.get("p_perm_greater"))
    out["seconds"] = num(results.get("seconds"))
    return out


def _git() -> str | None:
    from sublim.runs import git_revision

    try:
        return git_revision()
    except Exception:  # noqa: BLE001 - bookkeeping only
        return None


def _safe(fn: Any, *args: Any, **kwargs: Any) -> bool:
    """Run a registry write; on a database error say so once on stderr and go on."""
    try:
        fn(*args, **kwargs)
        return True
    except (sqlite3.Error, OSError) as e:
        import sys

        print(f"warning: run registry not updated ({db_path()}): {e}", file=sys.stderr)
        return False


def start(run_dir: str | Path, name: str, spec_hash: str, *, sweep: str | None = None, cell: str | None = None,
          path: str | Path | None = None) -> bool:
    """Record (or re-open, on resume) a run as ``running``."""
    def write() -> None:
        with connect(path) as con:
            con.execute(
                "INSERT INTO runs (dir, name, spec_hash, status, started, host, git, sweep, cell) "
                "VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?) ON CONFLICT(dir) DO UPDATE SET status='running', "
                "name=excluded.name, spec_hash=excluded.spec_hash, started=excluded.started, finished=NULL, "
                "error=NULL, host=excluded.host, git=excluded.git, "
                "sweep=COALESCE(excluded.sweep, runs.sweep), cell=COALESCE(excluded.cell, runs.cell)",
                (str(Path(run_dir).resolve()), name, spec_hash, time.time(), socket.gethostname(), _git(), sweep,
                 cell))
    return _safe(write)


def finish(run_dir: str | Path, *, results: dict[str, Any] | None = None, error: str | None = None,
           path: str | Path | None = None) -> bool:
    """Mark a run ``done`` with its key metrics, or ``failed`` with ``error``'s first line."""
    def write() -> None:
        now = time.time()
        with connect(path) as con:
            con.execute(
                "UPDATE runs SET status=?, finished=?, seconds=? - started, error=?, metrics=? WHERE dir=?",
                ("failed" if error is not None else "done", now, now,
                 (error.splitlines() or [""])[0][:500] if error is not None else None,
                 json.dumps(key_metrics(results) if results else {}), str(Path(run_dir).resolve())))
    return _safe(write)


def index(root: str | Path, path: str | Path | None = None) -> int:
    """Add (or refresh) every run directory under ``root`` that holds a ``results.json``; returns how many."""
    from sublim.runs import hash_obj

    n = 0
    for res_path in sorted(Path(root).glob("**/results.json")):
        try:
            results = json.loads(res_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        spec = results.get("spec") or {}
        d = res_path.parent.resolve()
        mtime = res_path.stat().st_mtime
        with connect(path) as con:
            con.execute(
                "INSERT INTO runs (dir, name, spec_hash, status, started, finished, seconds, metrics) "
                "VALUES (?, ?, ?, 'done', ?, ?, ?, ?) ON CONFLICT(dir) DO UPDATE SET status='done', "
                "finished=excluded.finished, seconds=excluded.seconds, metrics=excluded.metrics",
                (str(d), spec.get("name", d.name), hash_obj(spec)[:16] if spec else "", mtime - (results.get("seconds")
                 or 0.0), mtime, results.get("seconds"), json.dumps(key_metrics(results))))
        n += 1
    return n


def _row(r: sqlite3.Row) -> dict[str, Any]:
    d = dict(r)
    d["metrics"] = json.loads(d.get("metrics") or "{}")
    return d


def list_runs(*, name: str | None = None, status: str | None = None, sweep: str | None = None,
              path: str | Path | None = None) -> list[dict[str, Any]]:
    """Runs, newest first, filtered by name substring, status and sweep."""
    if status is not None and status not in STATUSES:
        raise RegistryError(f"--status {status!r}: expected one of {', '.join(STATUSES)}")
    q, args = "SELECT * FROM runs WHERE 1=1", []
    if name:
        q += " AND name LIKE ?"
        args.append(f"%{name}%")
    if status:
        q += " AND status = ?"
        args.append(status)
    if sweep:
        q += " AND sweep = ?"
        args.append(sweep)
    with connect(path) as con:
        return [_row(r) for r in con.execute(q + " ORDER BY started DESC", args)]


def get_run(key: str, path: str | Path | None = None) -> dict[str, Any]:
    """One run by its directory (as given or resolved) or by a unique name / directory-name prefix."""
    with connect(path) as con:
        exact = con.execute("SELECT * FROM runs WHERE dir = ?", (str(Path(key).resolve()),)).fetchone()
        if exact:
            return _row(exact)
        rows = [r for r in con.execute("SELECT * FROM runs") if Path(r["dir"]).name.startswith(key)
                or r["name"] == key]
    if not rows:
        raise RegistryError(f"no run {key!r} in the registry ({db_path()}); see 'sublim runs ls'")
    if len(rows) > 1:
        raise RegistryError(f"{key!r} matches {len(rows)} runs ({', '.join(Path(r['dir']).name for r in rows[:5])}"
                            f"{', ...' if len(rows) > 5 else ''}); give more of the directory name")
    return _row(rows[0])


def compare(keys: Sequence[str], path: str | Path | None = None) -> tuple[list[str], list[list[Any]]]:
    """A metrics table: one row per metric, one column per run (the union of their metrics)."""
    runs = [get_run(k, path) for k in keys]
    names = sorted({m for r in runs for m in r["metrics"]})
    header = ["metric", *[Path(r["dir"]).name for r in runs]]
    return header, [[m, *[r["metrics"].get(m) for r in runs]] for m in names]
