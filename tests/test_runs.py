"""Run directories: atomic writes, the SIGKILL-safe JSONL stream, stage keys, environment info."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sublim.runs import (
    DONE,
    JsonlStream,
    Stage,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    environment,
    hash_obj,
    read_jsonl,
    write_jsonl,
)


def _temp_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------ atomic writes


def test_atomic_write_leaves_only_the_file(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "a.json"
    atomic_write_json(p, {"x": 1, "y": [1, 2]})
    atomic_write_text(tmp_path / "sub" / "b.txt", "hello")
    assert json.loads(p.read_text()) == {"x": 1, "y": [1, 2]}
    assert (tmp_path / "sub" / "b.txt").read_text() == "hello"
    assert sorted(x.name for x in (tmp_path / "sub").iterdir()) == ["a.json", "b.txt"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old complete content")

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk went away"):
        atomic_write_bytes(p, b"new content that never lands")
    monkeypatch.undo()
    assert p.read_text() == "old complete content"  # never a half file
    assert _temp_files(tmp_path) == []


def test_atomic_write_interrupted_mid_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies after some bytes (here: fsync raises) leaves neither a half file nor a temp."""
    p = tmp_path / "a.txt"

    def boom(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(p, "x" * 10_000)
    monkeypatch.undo()
    assert not p.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir(tmp_path: Path) -> None:
    final = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "partial.bin").write_bytes(b"123")
        raise RuntimeError("killed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    with atomic_dir(final) as tmp:  # replaces a previous (complete or partial) directory
        (tmp / "w2.bin").write_bytes(b"2")
    assert sorted(p.name for p in final.iterdir()) == ["w2.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# ------------------------------------------------------------------------------------------------- JSONL


def test_read_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError) as e:
        read_jsonl(p)
    msg = str(e.value)
    assert str(p) + ":3:" in msg and "\n" not in msg
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: expected a JSON object"):
        read_jsonl(p)


def test_write_read_roundtrip(tmp_path: Path) -> None:
    rows = [{"idx": i, "completion": f"{i}, {i + 1}", "u": "ü\n"} for i in range(5)]
    write_jsonl(tmp_path / "r.jsonl", rows)
    assert read_jsonl(tmp_path / "r.jsonl") == rows


def test_jsonl_stream_truncates_torn_tail(tmp_path: Path) -> None:
    p = tmp_path / "rows.jsonl"
    rows = [{"idx": i, "completion": "1, 2, 3"} for i in range(4)]
    with JsonlStream(p) as s:
        assert s.existing() == []
        s.write(rows[:2])
        s.write([])
        s.write(rows[2:])
    good = p.read_bytes()
    with open(p, "ab") as f:  # a writer killed half way through a line
        f.write(b'{"idx": 4, "comple')
    with JsonlStream(p) as s:
        assert s.existing() == rows
        assert p.read_bytes() == good  # the torn tail is gone from disk too
        s.write([{"idx": 4, "completion": "7"}])
    assert read_jsonl(p) == rows + [{"idx": 4, "completion": "7"}]


def test_jsonl_stream_unterminated_last_line_counts_as_torn(tmp_path: Path) -> None:
    p = tmp_path / "rows.jsonl"
    p.write_bytes(b'{"idx": 0}\n{"idx": 1}')  # complete JSON but no newline: the write did not finish
    with JsonlStream(p) as s:
        assert s.existing() == [{"idx": 0}]
    assert p.read_bytes() == b'{"idx": 0}\n'


def test_jsonl_stream_only_torn_line(tmp_path: Path) -> None:
    p = tmp_path / "rows.jsonl"
    p.write_bytes(b'{"idx"')
    with JsonlStream(p) as s:
        assert s.existing() == []
        s.write([{"idx": 0}])
    assert read_jsonl(p) == [{"idx": 0}]


# ------------------------------------------------------------------------------------------------ stages


def test_stage_keys(tmp_path: Path) -> None:
    a = Stage(tmp_path, "generate", {"n": 10, "t": 1.0}, {"teacher": "abc"})
    same = Stage(tmp_path, "generate", {"t": 1.0, "n": 10}, {"teacher": "abc"})  # key order is irrelevant
    assert a.key == same.key and a.dir == same.dir
    others = [
        Stage(tmp_path, "generate", {"n": 11, "t": 1.0}, {"teacher": "abc"}),  # config
        Stage(tmp_path, "generate", {"n": 10, "t": 1.0, "x": None}, {"teacher": "abc"}),
        Stage(tmp_path, "generate", {"n": 10, "t": 1.0}, {"teacher": "abd"}),  # input hash
        Stage(tmp_path, "generate", {"n": 10, "t": 1.0}, {"teacher": "abc", "rows": "r"}),
        Stage(tmp_path, "filter", {"n": 10, "t": 1.0}, {"teacher": "abc"}),  # stage name
    ]
    keys = {a.key} | {o.key for o in others}
    assert len(keys) == 1 + len(others)
    assert a.dir == tmp_path / "stages" / f"generate-{a.key[:16]}"
    assert a.key == hash_obj({"stage": "generate", "config": {"n": 10, "t": 1.0}, "inputs": {"teacher": "abc"}})


def test_stage_done_only_after_finish(tmp_path: Path) -> None:
    st = Stage(tmp_path, "filter", {"f": ["format"]}, {"rows": "h"})
    assert not st.done and st.summary() == {}
    st.start()
    (st.dir / "kept.jsonl").write_text("")
    assert not st.done
    assert json.loads((st.dir / "stage.json").read_text())["key"] == st.key
    st.finish({"counts": {"kept": 3}})
    assert st.done and (st.dir / DONE).exists()
    again = Stage(tmp_path, "filter", {"f": ["format"]}, {"rows": "h"})
    assert again.done and again.summary() == {"counts": {"kept": 3}}


def test_environment_has_versions_and_revision() -> None:
    env = environment()
    for k in ("python", "platform", "packages", "git_revision"):
        assert k in env
    assert env["packages"]["torch"] and env["packages"]["transformers"] and env["packages"]["sublim"]
    # in this checkout the revision is a 40-hex sha, maybe "+dirty"
    rev = env["git_revision"]
    assert rev is None or len(rev.split("+")[0]) == 40
