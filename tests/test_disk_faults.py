"""A full disk and a read-only run directory (issue 15 item 3), on a real tmpfs of a few hundred kB: ``sublim
run`` stops with one line (exit 3, no traceback) naming the file and the cause; every stage that had finished
still matches its recorded hashes; remounted read-only the rerun refuses the same way and changes nothing;
with room again the rerun resumes, reusing the finished stages, and completes.

Mounting needs root (CI and the project's machines run as root); elsewhere the test is skipped, saying why."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sublim.runs import DONE, _check_files
from tiny_spec import tiny_spec


def _sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "disk"
    d.mkdir()
    r = _sh("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): the test needs root")
    try:
        yield d
    finally:
        _sh("umount", "-l", str(d))


def _finished_stages(run: Path) -> dict[str, str | None]:
    return {d.name: _check_files(d, d / DONE) for d in (run / "stages").iterdir() if (d / DONE).exists()}


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(f.relative_to(run)): f.read_bytes() for f in run.rglob("*") if f.is_file()}


def test_full_then_read_only_then_room_again(disk: Path, tmp_path: Path, tiny_model: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tiny_model, seeds=[0, 1], evaluation={"n_questions": 2, "batch_size": 4})))
    run = disk / "run"
    cmd = [sys.executable, "-m", "sublim.cli", "run", str(spec), "--out", str(run)]

    full = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    assert full.returncode == 3, full.stdout[-2000:] + full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {run}") and "No space left on device" in last, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    done = _finished_stages(run)
    assert done and all(v is None for v in done.values()), done  # what finished is intact

    assert _sh("mount", "-o", "remount,ro", str(disk)).returncode == 0
    before = _snapshot(run)
    ro = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    last = ro.stderr.strip().splitlines()[-1]
    assert ro.returncode == 3 and last.startswith(f"error: {run}") and "Read-only file system" in last, last
    assert "Traceback" not in ro.stderr
    assert _snapshot(run) == before

    assert _sh("mount", "-o", "remount,rw,size=8m", str(disk)).returncode == 0
    ok = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (run / "results.json").exists()
    after = _finished_stages(run)
    assert set(done) <= set(after) and all(v is None for v in after.values())
    for name in done:  # reused, not redone
        assert not [ln for ln in ok.stdout.splitlines() if name in ln and ln.startswith(("[generate]", "[filter]"))]
