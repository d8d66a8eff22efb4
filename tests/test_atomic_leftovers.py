"""Atomic writes after a SIGKILL (issue 15 item 3): a killed writer's temp file or directory is removed by the
next write of the same path; a live writer's and another host's are left alone; files and directories get the
modes an ordinary open / mkdir would give; replacing a directory never leaves it half deleted."""
from __future__ import annotations

import os
import platform
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sublim.runs import atomic_dir, atomic_file, atomic_write_bytes, atomic_write_json


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                       check=True)
    return int(p.stdout)


def test_next_write_removes_a_killed_writers_leftovers(tmp_path: Path) -> None:
    host = platform.node() or "host"
    dead = _dead_pid()
    f = tmp_path / "results.json"
    stale = tmp_path / f".results.json.{host}-{dead}.abc123.tmp"
    stale.write_text("{")
    live = tmp_path / f".results.json.{host}-{os.getppid()}.def456.tmp"  # a live process (our parent)
    live.write_text("{")
    other_host = tmp_path / f".results.json.elsewhere-{dead}.ghi789.tmp"
    other_host.write_text("{")
    unrelated = tmp_path / f".results.jsonl.{host}-{dead}.jkl.tmp"  # another path's
    unrelated.write_text("{")
    atomic_write_json(f, {"ok": 1})
    assert not stale.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()
    assert f.read_text().strip().startswith("{")


def test_atomic_dir_sweeps_killed_dirs_and_replaces_without_a_half_deleted_window(tmp_path: Path) -> None:
    host = platform.node() or "host"
    dead = _dead_pid()
    final = tmp_path / "model"
    (tmp_path / f".model.{host}-{dead}.x1y2").mkdir()
    (tmp_path / f".model.{host}-{dead}.x1y2" / "weights.bin").write_bytes(b"\0" * 10)
    (tmp_path / f".model.{host}-{dead}.old.z9").mkdir()
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("old")
    seen = []
    real_replace = os.replace

    def spy(src: str | Path, dst: str | Path) -> None:
        seen.append((Path(src).name, Path(dst).name, final.exists() and (final / "a.txt").exists()))
        real_replace(src, dst)

    os.replace = spy  # type: ignore[assignment]
    try:
        with atomic_dir(final) as d:
            (d / "a.txt").write_text("new")
    finally:
        os.replace = real_replace  # type: ignore[assignment]
    assert (final / "a.txt").read_text() == "new"
    # the old directory moved aside whole (complete when it left), the new one renamed in
    assert seen[0][1] == "model" and seen[0][2] is True and seen[1][1] == "model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_modes_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        f = atomic_write_bytes(tmp_path / "f.bin", b"x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
        with atomic_file(tmp_path / "p.parquet") as t:
            t.write_bytes(b"PAR1")
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "p.parquet").stat().st_mode) == 0o640


def test_atomic_file_removes_its_temp_on_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "out.parquet") as t:
        t.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_write_mitigated_drops_the_old_manifest_before_the_new_rows(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun into an existing --out that dies after the rows leaves rows without a manifest, never new rows
    under the previous run's manifest."""
    import sublim.runs
    from sublim.audit.provenance import manifest_path
    from sublim.mitigate.apply import Context, Mitigated, write_mitigated
    from sublim.runs import write_jsonl

    parent = tmp_path / "data.jsonl"
    rows = [{"prompt": "Continue: 1, 2", "completion": "3, 4"}, {"prompt": "Continue: 5", "completion": "6"}]
    write_jsonl(parent, rows)
    out = tmp_path / "out.jsonl"
    write_mitigated(out, Mitigated(rows[:1], {"dropped": 1}, "paraphrase", {}), parent, rows, Context())
    assert manifest_path(out).exists()

    def killed(*a: object, **k: object) -> None:
        raise KeyboardInterrupt("killed after the rows")

    import sublim.audit.provenance as prov
    monkeypatch.setattr(prov, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        write_mitigated(out, Mitigated(rows, {"dropped": 0}, "paraphrase", {}), parent, rows, Context())
    assert not manifest_path(out).exists()
    assert len(sublim.runs.read_jsonl(out)) == 2
