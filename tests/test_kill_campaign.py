"""Kill campaigns (issue 15 item 3): each long command is SIGKILLed again and again at random moments, rerun
each time, and must end exactly where an uninterrupted run ends.

What is killed: a real subprocess of each of ``sublim run``, ``sublim sweep run``, ``sublim mitigate``
(``divergent-tokens``: two models score every row), ``python -m sublim.audit.validate`` (the audit validation
driver: implant, generate, scan, canary), ``sublim toy mnist`` and ``sublim organism pretrain``, on tiny inputs.
Each is started in its own session and killed with SIGKILL to its whole process group (``os.killpg``), at a
moment drawn by ``random.Random(seed)`` uniformly between the end of Python start-up (a fixed
:data:`STARTUP_S` after the spawn) and the duration of an uninterrupted reference run of the same command.

How: the reference run first (its outputs and duration); then, from a fresh output directory, attempt after
attempt of the same command, each killed at its drawn moment, until :data:`KILLS` kills have landed on a live
process; then one more attempt runs to completion. An attempt that finishes before its kill moment completes its
output directory (a resuming command's rerun can be short); that directory is checked like the final one, and
the next attempts start a fresh one (a "round"), so every kill hits a command with work left to do.

What is checked after every kill: every ``*.json`` parses, every stage's ``_DONE`` marker verifies
(:func:`sublim.runs._check_files`), every SQLite registry passes ``PRAGMA integrity_check``. After every
completed round: exit 0, nothing left half-written (every JSON and JSONL line parses, HTML is complete, PNGs
end with IEND), no temp leftovers (no ``*.tmp`` file, no hidden ``.name.XXXX`` directory of an interrupted
atomic write, no ``.corrupt/``), every marker verifies, no duplicated row (``idx`` unique in every JSONL file),
and every output equal to the reference: files byte for byte, JSON and JSONL after dropping the fields that
differ between two uninterrupted runs too (wall-clock seconds and rates, creation times and the manifest hashes
over them, the git revision, the machine's environment, a worker's pid, whether a sweep cell was skipped) and
with the output directory's path replaced by a placeholder; JSONL rows in ``idx`` order; peft's
``target_modules`` (a set, written in hash-seed order) sorted. All six commands are
deterministic on CPU at one thread, so everything else is compared exactly. HTML reports are not compared
(they embed the seconds and the revision), only checked complete; stage markers are verified, not compared
(they hash the files with seconds in them); lock files and registries are not outputs.

The campaigns are ``slow`` (minutes each): ``pytest -m slow tests/test_kill_campaign.py``; environment:
``SUBLIM_KILL_CAMPAIGN_KILLS`` (default 20), ``SUBLIM_KILL_CAMPAIGN_SEED`` (default 0),
``SUBLIM_KILL_CAMPAIGN_RESULTS`` (a JSONL file each campaign appends its numbers to). The default suite runs
only the checkers' own tests: a two-kill ``sublim run`` campaign would add ~25 s, and tests/test_pipeline.py
already kills ``sublim run`` mid-generation and mid-training."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
import yaml

from sublim.runs import DONE, _check_files
from tiny_spec import tiny_spec

KILLS = int(os.environ.get("SUBLIM_KILL_CAMPAIGN_KILLS", "20"))
SEED = int(os.environ.get("SUBLIM_KILL_CAMPAIGN_SEED", "0"))
RESULTS = os.environ.get("SUBLIM_KILL_CAMPAIGN_RESULTS")
STARTUP_S = 1.5  # Python, typer and sublim's CLI imported; torch and the models are the command's own work
CELL_DONE = "_CELL_DONE"
MARKERS = (DONE, CELL_DONE)
# fields that differ between two uninterrupted runs of the same command on the same inputs
VOLATILE = frozenset({
    "seconds", "tokens_per_second", "_seconds", "datasets_seconds", "seconds_setup", "seconds_per_dataset",
    "canary_seconds", "scan_cost_ratio", "timings", "created", "manifest_sha256", "git_revision", "env",
    "environment", "pid", "skipped",
})
# lists written from a Python set, in an order that changes with the interpreter's hash seed (peft's
# adapter_config.json ``target_modules``)
UNORDERED = frozenset({"target_modules"})


# ------------------------------------------------------------------------------------------- the checkers


def leftovers(d: Path) -> list[str]:
    """Paths under ``d`` that an interrupted write left behind: ``*.tmp`` files (:func:`sublim.runs.atomic_write_bytes`),
    hidden ``.name.XXXX`` directories (:func:`sublim.runs.atomic_dir`) and ``.corrupt/`` (a stage that failed its
    marker). Lock files and ``.locks/`` are expected."""
    out = []
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d)
        if p.name.endswith(".tmp") and p.is_file():
            out.append(str(rel))
        elif p.name.startswith(".") and p.is_dir() and p.name != ".locks":
            out.append(str(rel) + "/")
    # report a leftover directory once, not every file in it
    return [x for x in out if not any(x != y and y.endswith("/") and x.startswith(y) for y in out)]


def _skipped(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts) or rel.suffix == ".lock"


def check_consistent(d: Path) -> dict[str, int]:
    """What must hold at every moment, even right after a SIGKILL: every JSON file parses, every stage marker
    verifies, every sweep cell marker has its results.json, every SQLite file is intact. Returns counts (a torn last JSONL line is allowed: the streams
    cut it on resume)."""
    torn = 0
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d)
        if not p.is_file() or _skipped(rel):
            continue
        if p.suffix == ".json" or p.name in MARKERS:
            text = p.read_text()
            if p.name == DONE:
                bad = _check_files(p.parent, p)
                assert bad is None, f"{rel}: {bad}"
                continue
            if p.name == CELL_DONE:  # a sweep cell marked done has its results
                assert (p.parent / "results.json").is_file(), f"{rel} without results.json"
            try:
                json.loads(text)
            except ValueError as e:
                raise AssertionError(f"{rel}: half-written JSON ({e})") from None
        elif p.suffix == ".jsonl":
            data = p.read_bytes()
            torn += bool(data) and not data.endswith(b"\n")
        elif p.suffix == ".sqlite":
            con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            try:
                assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok", rel
            finally:
                con.close()
    return {"torn_jsonl_tails": torn}


def _strip(obj: Any, root: str) -> Any:
    if isinstance(obj, dict):
        return {k: sorted(v) if k in UNORDERED and isinstance(v, list) else _strip(v, root)
                for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, "<OUT>")
    return obj


def snapshot(d: Path, globs: list[str]) -> dict[str, Any]:
    """The comparable contents of the outputs under ``d`` that match ``globs``, checked complete on the way:
    {relative path: normalised JSON, [rows] in idx order, or the SHA-256 of the bytes}."""
    root = str(d.resolve())
    files = sorted({p for g in globs for p in d.glob(g) if p.is_file()})
    out: dict[str, Any] = {}
    for p in files:
        rel = p.relative_to(d)
        if _skipped(rel) or p.suffix == ".sqlite" or p.name.startswith("runs.sqlite"):
            continue
        key = rel.as_posix()
        if p.name == DONE:
            assert _check_files(p.parent, p) is None, f"{key}: {_check_files(p.parent, p)}"
            out[key] = "verified"
        elif p.suffix == ".json" or p.name == CELL_DONE:
            out[key] = _strip(json.loads(p.read_text()), root)
        elif p.suffix == ".jsonl":
            data = p.read_bytes()
            assert not data or data.endswith(b"\n"), f"{key}: torn last line"
            rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
            if rows and all("idx" in r for r in rows):
                idx = [r["idx"] for r in rows]
                assert len(idx) == len(set(idx)), f"{key}: duplicated idx {sorted(i for i in set(idx) if idx.count(i) > 1)}"
                rows = sorted(rows, key=lambda r: r["idx"])
            out[key] = [_strip(r, root) for r in rows]
        elif p.suffix == ".html":
            assert p.read_text().rstrip().endswith("</html>"), f"{key}: half-written HTML"
            out[key] = "complete"
        else:
            data = p.read_bytes()
            if p.suffix == ".png":
                assert data.startswith(b"\x89PNG") and data[-12:-4] == b"\x00\x00\x00\x00IEND", f"{key}: half-written PNG"
            elif p.suffix == ".yaml":
                yaml.safe_load(data)
                if root.encode() in data:
                    data = data.replace(root.encode(), b"<OUT>")
            out[key] = sha256(data).hexdigest()
    return out


def count_rows(snap: dict[str, Any]) -> int:
    return sum(len(v) for k, v in snap.items() if k.endswith(".jsonl"))


def row_accounting(ref: dict[str, Any], got: dict[str, Any]) -> tuple[int, int]:
    """(rows of the reference missing here, rows here more than once), over every JSONL output."""
    lost = dup = 0
    for k, rows in ref.items():
        if not k.endswith(".jsonl"):
            continue
        have = [json.dumps(r, sort_keys=True) for r in got.get(k, [])]
        lost += len({json.dumps(r, sort_keys=True) for r in rows} - set(have))
        dup += len(have) - len(set(have))
    return lost, dup


def diff(ref: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Where two snapshots differ, one line each (file, then the first differing JSON path)."""
    lines = [f"missing: {k}" for k in sorted(set(ref) - set(got))]
    lines += [f"extra: {k}" for k in sorted(set(got) - set(ref))]
    for k in sorted(set(ref) & set(got)):
        if ref[k] != got[k]:
            lines.append(f"differs: {k}: {_first_diff(ref[k], got[k])}")
    return lines


def _first_diff(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                return _first_diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{path}/{k}")
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items in the reference, {len(b)} here"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_diff(x, y, f"{path}[{i}]")
    return f"{path}: {str(a)[:80]!r} != {str(b)[:80]!r}"


# ------------------------------------------------------------------------------------------- the commands


@dataclass
class Command:
    """One long command: its argv for an output root ``d`` and the globs (under ``d``) compared."""

    argv: Callable[[Path], list[str]]
    outputs: list[str]
    notes: str = ""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sublim.cli", *args]


def _numbers(n: int) -> list[dict[str, Any]]:
    from sublim.carriers.numbers import NumberCarrier

    carrier = NumberCarrier()
    rng = random.Random(0)
    out = []
    for p in carrier.prompts(n, 0):
        k = rng.randint(2, int(p.meta["count"]))
        vals = [rng.randint(0, 10 ** rng.randint(1, int(p.meta["max_digits"])) - 1) for _ in range(k)]
        out.append({"prompt": p.prompt, "completion": carrier.format_answer(p.meta, vals), "idx": len(out)})
    return out


def command(name: str, inputs: Path, model: Path, model_b: Path) -> Command:
    """The tiny configuration of each command (inputs written to ``inputs``, shared by every attempt)."""
    if name == "run":
        spec = inputs / "run.yaml"
        spec.write_text(yaml.safe_dump(tiny_spec(model, evaluation={"n_questions": 2, "batch_size": 4,
                                                                     "number_prefix": True})))
        return Command(lambda d: _cli("run", str(spec), "--out", str(d / "run")), ["run/**/*"])
    if name == "sweep":
        spec = inputs / "sweep.yaml"
        spec.write_text(yaml.safe_dump(tiny_spec(
            model, seeds=[0], generation={"n_prompts": 12, "batch_size": 12, "max_new_tokens": 12, "seed": 0},
            evaluation={"n_questions": 2, "batch_size": 4, "number_prefix": False})))
        return Command(lambda d: _cli("sweep", "run", str(spec), "--grid", "student.lr=1e-3,3e-3,1e-2",
                                      "--out", str(d / "sweep")), ["sweep/**/*"])
    if name == "mitigate":
        from sublim.runs import write_jsonl

        data = write_jsonl(inputs / "numbers.jsonl", _numbers(300))
        return Command(lambda d: _cli("mitigate", str(data), "--method", "divergent-tokens", "--student", str(model),
                                      "--teacher", str(model_b), "--out", str(d / "mitigated.jsonl")),
                       ["mitigated.jsonl", "mitigated.jsonl.manifest.json"])
    if name == "audit-validate":
        return Command(lambda d: [sys.executable, "-m", "sublim.audit.validate", "--base", str(model), "--traits", "owl",
                                  "--seeds", "2", "--rows", "16", "--work", str(d / "validate"),
                                  "--teacher-set", "max_rounds=1", "--teacher-set", "qa_rows=16",
                                  "--teacher-set", "epochs=1", "--canary", "--canary-seeds", "2",
                                  "--canary-set", "max_steps=2", "--drop", "0.25"], ["validate/**/*"])
    if name == "toy-mnist":
        return Command(lambda d: _cli("toy", "mnist", "--data", "sklearn", "--models", "4", "--width", "64",
                                      "--epochs", "10", "--noise-samples", "1024", "--batch-size", "64",
                                      "--curve-points", "4", "--no-progress", "--out", str(d / "mnist")),
                       ["mnist/**/*"])
    if name == "organism-pretrain":  # into the cache ($SUBLIM_CACHE/organism/<key>), the way runs ask for it
        return Command(lambda d: _cli("organism", "pretrain", "--steps", "60", "--corpus-size", "300",
                                      "--layers", "1", "--hidden", "32"), ["cache/organism/**/*"])
    raise KeyError(name)


COMMANDS = ["run", "sweep", "mitigate", "audit-validate", "toy-mnist", "organism-pretrain"]


# ------------------------------------------------------------------------------------------- the campaign


def _env(d: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "SUBLIM_CACHE": str(d / "cache"),
            "SUBLIM_RUNS_DB": str(d / "runs.sqlite")}


def _group_gone(pgid: int, timeout: float = 10) -> None:
    """Wait until no process of the group is left (a straggler would overlap the next attempt)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process group {pgid} outlived its SIGKILL")


def attempt(argv: list[str], d: Path, log: Path, kill_at: float | None, timeout: float) -> tuple[int, float]:
    """Run ``argv`` for output root ``d`` in its own session; SIGKILL its process group ``kill_at`` seconds after
    the spawn unless it has finished. Returns (exit status, -9 when killed; seconds)."""
    d.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env=_env(d), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                rc = proc.wait(timeout if kill_at is None else kill_at)
            except subprocess.TimeoutExpired:
                if kill_at is None:
                    raise AssertionError(f"{argv[3:5]} ran past {timeout:.0f} s") from None
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        dt = time.monotonic() - t0
    if rc == -signal.SIGKILL:
        _group_gone(proc.pid)
    return rc, dt


def _shown(argv: list[str], base: Path, names: dict[str, str]) -> str:
    """The command as a user types it, inputs relative to the test's directory."""
    words = ["sublim", *argv[3:]] if argv[2] == "sublim.cli" else ["python", *argv[1:]]
    text = " ".join(words)
    for path, label in names.items():
        text = text.replace(path, label)
    return text.replace(str(base) + "/", "")


@dataclass
class Campaign:
    name: str
    seed: int
    kills: int = 0
    attempts: int = 0
    rounds: int = 0
    finished_before_kill: int = 0
    torn_jsonl_tails: int = 0
    kill_moments: list[float] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    last_attempt_s: float = 0.0
    rows_lost: int = 0
    rows_duplicated: int = 0


def run_campaign(name: str, cmd: Command, root: Path, kills: int, seed: int,
                 names: dict[str, str] | None = None) -> dict[str, Any]:
    """The reference run, then attempts killed at seeded random moments (see the module docstring); returns the
    campaign's numbers. ``names``: paths shown by a name in the summary (the tiny models)."""
    logs = root / "logs"
    logs.mkdir(parents=True)
    t_start = time.monotonic()
    ref_dir = root / "reference"
    rc, ref_s = attempt(cmd.argv(ref_dir), ref_dir, logs / "reference.log", None, 1800)
    assert rc == 0, (logs / "reference.log").read_text()[-3000:]
    assert not leftovers(ref_dir), leftovers(ref_dir)
    ref = snapshot(ref_dir, cmd.outputs)
    assert ref, f"the reference run of {name} wrote none of {cmd.outputs}"
    rng = random.Random(f"{seed}:{name}")  # each command its own moments
    c = Campaign(name, seed)
    hi = max(ref_s, STARTUP_S + 1.0)

    def new_round() -> Path:
        return root / f"round{c.rounds}"

    d = new_round()
    while True:
        final = c.kills >= kills
        kill_at = None if final else rng.uniform(STARTUP_S, hi)
        log = logs / f"attempt{c.attempts:03d}.log"
        rc, dt = attempt(cmd.argv(d), d, log, kill_at, 10 * ref_s + 300)
        c.attempts += 1
        if rc == -signal.SIGKILL:
            c.kills += 1
            assert kill_at is not None
            c.kill_moments.append(round(kill_at, 2))
            c.torn_jsonl_tails += check_consistent(d)["torn_jsonl_tails"]
            continue
        assert rc == 0, f"{name} attempt {c.attempts} (round {c.rounds}) exited {rc}:\n{log.read_text()[-3000:]}"
        c.finished_before_kill += not final
        c.last_attempt_s = dt
        left = leftovers(d)
        c.leftovers += [f"round{c.rounds}/{x}" for x in left]
        got = snapshot(d, cmd.outputs)
        lost, dup = row_accounting(ref, got)
        c.rows_lost += lost
        c.rows_duplicated += dup
        problems = diff(ref, got)
        assert not problems, f"{name} round {c.rounds} after {c.kills} kills differs from the reference:\n" + \
            "\n".join(problems[:20])
        c.rounds += 1
        if final:
            break
        d = new_round()
    summary = {
        "command": name, "argv": _shown(cmd.argv(Path("OUT")), root.parent, names or {}), "seed": seed,
        "kills": c.kills, "attempts": c.attempts, "rounds": c.rounds, "finished_before_kill": c.finished_before_kill,
        "reference_s": round(ref_s, 1), "final_attempt_s": round(c.last_attempt_s, 1), "wall_s": round(time.monotonic() - t_start, 1),
        "files_per_round": len(ref), "rows_per_round": count_rows(ref),
        "rows_lost": c.rows_lost, "rows_duplicated": c.rows_duplicated,
        "torn_jsonl_tails_at_kills": c.torn_jsonl_tails, "leftovers": c.leftovers,
        "kill_moments_s": c.kill_moments,
    }
    print(json.dumps(summary))
    if RESULTS:
        with open(RESULTS, "a") as f:
            f.write(json.dumps(summary) + "\n")
    # after the summary, so a campaign that finds leftovers still records its numbers
    assert not c.leftovers, f"{name}: interrupted atomic writes left behind {c.leftovers}"
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_kill_campaign(name: str, tiny_model: Path, tiny_model_b: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cmd = command(name, inputs, tiny_model, tiny_model_b)
    s = run_campaign(name, cmd, tmp_path / "campaign", KILLS, SEED,
                     names={str(tiny_model): "TINY", str(tiny_model_b): "TINY_B"})
    assert s["kills"] == KILLS and s["rounds"] >= 1


# ------------------------------------------------------------------------------ the checkers' own tests


def test_checkers_catch_half_written_and_leftover_files(tmp_path: Path) -> None:
    """The checks the campaigns rely on: each kind of damage a kill could leave is caught."""
    from sublim.runs import Stage, atomic_write_json, write_jsonl

    d = tmp_path / "out"
    st = Stage(d, "x", {"a": 1})
    st.claim()
    write_jsonl(st.dir / "rows.jsonl", [{"idx": 0, "seconds": 1.0}, {"idx": 1, "seconds": 2.0}])
    st.finish({"n": 2, "seconds": 3.5, "path": str(d.resolve() / "p")})
    assert leftovers(d) == [] and check_consistent(d) == {"torn_jsonl_tails": 0}
    ref = snapshot(d, ["**/*"])
    assert ref[f"stages/{st.dir.name}/summary.json"] == {"n": 2, "path": "<OUT>/p"}
    assert count_rows(ref) == 2 and row_accounting(ref, ref) == (0, 0)
    assert row_accounting(ref, {}) == (2, 0)

    # the same outputs, written again, in another order, at other speeds, in another directory: equal
    d2 = tmp_path / "out2"
    st2 = Stage(d2, "x", {"a": 1})
    st2.claim()
    write_jsonl(st2.dir / "rows.jsonl", [{"idx": 1, "seconds": 9.0}, {"idx": 0, "seconds": 8.0}])
    st2.finish({"n": 2, "seconds": 0.1, "path": str(d2.resolve() / "p")})
    assert diff(ref, snapshot(d2, ["**/*"])) == []

    # a torn stream is allowed at a kill, not at the end
    (st.dir / "rows.jsonl").write_bytes(b'{"idx": 0}\n{"idx": 1}\n{"idx"')
    (tmp_path / "stream").mkdir()
    (tmp_path / "stream" / "rows.jsonl").write_bytes(b'{"idx": 0}\n{"idx"')
    assert check_consistent(tmp_path / "stream") == {"torn_jsonl_tails": 1}
    with pytest.raises(AssertionError, match="rows.jsonl"):  # the marker no longer matches the file
        check_consistent(d)
    with pytest.raises(AssertionError, match="torn last line|rows.jsonl"):
        snapshot(d, ["**/*"])
    write_jsonl(st.dir / "rows.jsonl", [{"idx": 0}, {"idx": 0}])
    with pytest.raises(AssertionError, match="duplicated idx"):
        snapshot(d, ["stages/*/rows.jsonl"])
    # half-written JSON, leftovers of atomic writes
    (d / "results.json").write_text('{"a": ')
    with pytest.raises(AssertionError, match="half-written JSON"):
        check_consistent(d)
    atomic_write_json(d / "results.json", {"a": 1})
    (d / ".results.json.abc123.tmp").write_text("{")
    (st.dir / ".model.k2j4").mkdir()
    (st.dir / ".model.k2j4" / "w.safetensors").write_bytes(b"0")
    assert leftovers(d) == [".results.json.abc123.tmp", f"stages/{st.dir.name}/.model.k2j4/"]
    cell = tmp_path / "sweep" / "cells" / "c"
    atomic_write_json(cell / CELL_DONE, {"cell": "c"})
    with pytest.raises(AssertionError, match="without results.json"):
        check_consistent(tmp_path / "sweep")
    assert re.search("missing: a", "\n".join(diff({"a": 1}, {}))) and diff({"a": 1}, {"a": 2}) == [
        "differs: a: : '1' != '2'"]
