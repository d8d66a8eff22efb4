"""A finished stage whose files were truncated, edited or deleted is never silently reused (issue 15 item 3):
its ``_DONE`` marker records every file's size and SHA-256; a mismatch moves the stage to ``.corrupt/`` (kept)
with a one-line notice, and the stage is recomputed to the same result."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import sublim
from sublim.runs import DONE, Stage
from sublim.spec import ExperimentSpec
from tiny_spec import tiny_spec

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Any]:
    spec = ExperimentSpec.model_validate(tiny_spec(tiny_model, seeds=[0], evaluation={"n_questions": 2,
                                                                                   "batch_size": 4}))
    run = tmp_path_factory.mktemp("integrity") / "run"
    res = sublim.run(spec, run, log=lambda m: None)
    return {"spec": spec, "run": run, "results": res}


def _one(run: Path, prefix: str) -> Path:
    return min((run / "stages").glob(f"{prefix}-*"))


def _damage_and_rerun(finished: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      damage: Any, stage_prefix: str, expect: str) -> list[str]:
    run = tmp_path / "run"
    shutil.copytree(finished["run"], run)
    victim = _one(run, stage_prefix)
    damage(victim)
    logs: list[str] = []
    res = sublim.run(finished["spec"], run, log=logs.append)
    err = capsys.readouterr().err
    assert f"stage {victim.name}: " in err and expect in err, err
    kept = list((run / ".corrupt").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith(victim.name)  # the damaged copy is kept, not deleted
    assert (victim / DONE).exists()  # recomputed in place
    assert res["evaluations"] == finished["results"]["evaluations"]
    return logs


def test_a_truncated_row_file_is_detected_and_recomputed(finished: dict[str, Any], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    def cut(d: Path) -> None:
        f = d / "kept.jsonl"
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    logs = _damage_and_rerun(finished, tmp_path, capsys, cut, "filter", "kept.jsonl is ")
    assert [m for m in logs if m.startswith("[filter]")]  # the filter ran again; generation was reused
    assert not [m for m in logs if m.startswith("[generate]")]


def test_an_edited_weight_file_of_the_same_size_is_detected(finished: dict[str, Any], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    def flip(d: Path) -> None:
        f = next((d / "model").glob("*.safetensors"))
        b = bytearray(f.read_bytes())
        b[-1] ^= 0x01  # one bit of the last weight: same size, other content
        f.write_bytes(bytes(b))
    logs = _damage_and_rerun(finished, tmp_path, capsys, flip, "student", "does not match the SHA-256")
    assert [m for m in logs if m.startswith("[students] training 1 ")]


def test_a_deleted_summary_is_detected(finished: dict[str, Any], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    _damage_and_rerun(finished, tmp_path, capsys, lambda d: (d / "summary.json").unlink(), "generate",
                      "summary.json is missing")


def test_markers_record_every_file_and_old_empty_markers_are_trusted(tmp_path: Path) -> None:
    st = Stage(tmp_path, "x", {"a": 1})
    assert st.claim()
    (st.dir / "out.txt").write_text("hello")
    (st.dir / "sub").mkdir()
    (st.dir / "sub" / "w.bin").write_bytes(b"\0" * 10)
    st.finish({"n": 1})
    files = json.loads((st.dir / DONE).read_text())["files"]
    assert set(files) == {"out.txt", "sub/w.bin", "summary.json", "stage.json"}
    assert files["sub/w.bin"][0] == 10
    (st.dir / DONE).write_text("")  # a marker written before markers held hashes
    (st.dir / "out.txt").write_text("changed")
    assert Stage(tmp_path, "x", {"a": 1}).done


def _dead_pid() -> int:
    import os
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert p.pid != os.getpid()
    return p.pid


def test_a_killed_writers_temp_file_is_not_listed_by_the_marker(tmp_path: Path) -> None:
    """CI's kill campaign found it: a SIGKILL between a marker's temp write and its rename left
    ``._DONE.<host>-<pid>.XXXXXXXX.tmp`` in the stage; the rerun listed that file in the new marker, and the
    marker's own atomic write then swept it, so the finished stage read as damaged and was recomputed."""
    import platform
    host = platform.node() or "host"
    pid = _dead_pid()
    st = Stage(tmp_path, "student", {"a": 1})
    assert st.claim()
    (st.dir / "rows.jsonl").write_text('{"x": 1}\n')
    (st.dir / f".{DONE}.{host}-{pid}.abcd1234.tmp").write_text("{")  # the killed writer's marker
    (st.dir / "model").mkdir()
    (st.dir / "model" / f".w.safetensors.{host}-{pid}.efgh5678.tmp").write_bytes(b"half")
    (st.dir / f".model2.{host}-{pid}.ijkl9012").mkdir()  # a killed atomic_dir
    (st.dir / f".model2.{host}-{pid}.ijkl9012" / "w.bin").write_bytes(b"half")
    st.finish({"n": 1})
    listed = json.loads((st.dir / DONE).read_text())["files"]
    assert sorted(listed) == ["rows.jsonl", "stage.json", "summary.json"]
    assert sorted(p.name for p in st.dir.rglob("*")) == sorted(
        [DONE, "model", "rows.jsonl", "stage.json", "summary.json"])  # the leftovers are gone
    assert Stage(tmp_path, "student", {"a": 1}).done


def test_a_marker_that_lists_a_temp_file_still_verifies(tmp_path: Path) -> None:
    """Markers written before temp files were left out may list one that is gone since: never content."""
    st = Stage(tmp_path, "student", {"a": 1})
    assert st.claim()
    (st.dir / "rows.jsonl").write_text('{"x": 1}\n')
    st.finish()
    marker = json.loads((st.dir / DONE).read_text())
    marker["files"][f".{DONE}.somehost-12345.abcd1234.tmp"] = [3, "0" * 64]
    (st.dir / DONE).write_text(json.dumps(marker))
    assert Stage(tmp_path, "student", {"a": 1}).done
    marker["files"]["rows.jsonl"][0] += 1  # a real file's damage is still caught
    (st.dir / DONE).write_text(json.dumps(marker))
    assert not Stage(tmp_path, "student", {"a": 1}).done
