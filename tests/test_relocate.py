"""Run directories are relocatable and shareable (issue 15, items 1-2): a run with a fine-tuned teacher, copied
elsewhere after the original moved away, reuses every finished stage; two identical runs in two places have
the same stage keys and byte-identical rows; no file a run writes names the place it was written; two real
``sublim run`` processes on one run directory at the same time each finish, and every stage's work is done
once."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import sublim
from sublim.runs import DONE, Stage, read_jsonl, release_held
from sublim.spec import ExperimentSpec
from tiny_spec import tiny_spec

torch.set_num_threads(1)

WORK = ("[generate]", "[filter]", "[students]", "[teacher]")


def _spec(model: Path) -> dict[str, Any]:
    return tiny_spec(
        model, seeds=[0],
        teacher={"kind": "finetuned", "qa_rows": 8, "min_target_prob": 0.0, "max_rounds": 1,
                 "train": {"method": "lora", "lora": {"rank": 2, "alpha": 4}, "epochs": 1, "batch_size": 4,
                           "lr": 1e-3}},
        generation={"n_prompts": 16, "batch_size": 8, "max_new_tokens": 16, "seed": 0},
        evaluation={"n_questions": 2, "batch_size": 4, "number_prefix": False},
    )


def _stage_names(run: Path) -> set[str]:
    return {d.name for d in (run / "stages").iterdir()}


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("relocate")
    spec = ExperimentSpec.model_validate(_spec(tiny_model))
    run = root / "a" / "run"
    res = sublim.run(spec, run, log=lambda m: None)
    return {"root": root, "spec": spec, "run": run, "results": res}


def test_a_copied_run_reuses_every_stage_after_the_original_moved(first: dict[str, Any]) -> None:
    copy = first["root"] / "b" / "run"
    shutil.copytree(first["run"], copy)
    moved = first["root"] / "a-moved"
    first["run"].parent.rename(moved)  # the original is gone from where its files were written
    try:
        logs: list[str] = []
        before = _stage_names(copy)
        res = sublim.run(first["spec"], copy, log=logs.append)
        assert _stage_names(copy) == before  # no new stage: every key was the same
        assert not [m for m in logs if m.startswith(WORK)], logs
        assert res["evaluations"] == first["results"]["evaluations"]
    finally:
        moved.rename(first["run"].parent)


def test_identical_runs_in_two_places_have_the_same_keys_and_rows(first: dict[str, Any]) -> None:
    other = first["root"] / "elsewhere" / "deeper" / "run"
    sublim.run(first["spec"], other, log=lambda m: None)
    assert _stage_names(other) == _stage_names(first["run"])
    gens = sorted(d.name for d in (other / "stages").iterdir() if d.name.startswith(("generate-", "filter-")))
    assert gens
    for name in gens:
        for f in ("rows.jsonl", "kept.jsonl", "kept.manifest.json"):
            a, b = first["run"] / "stages" / name / f, other / "stages" / name / f
            if a.exists():
                assert a.read_bytes() == b.read_bytes(), f"{name}/{f}"


def test_no_file_names_the_run_directory(first: dict[str, Any]) -> None:
    where = str(first["run"].parent)
    found = []
    for f in first["run"].rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".yaml", ".md", ".txt", ".html") and where in f.read_text():
            found.append(str(f.relative_to(first["run"])))
    assert not found, found
    rows = [r for d in (first["run"] / "stages").glob("generate-*") for r in read_jsonl(d / "rows.jsonl")]
    assert rows and all(r["teacher_fingerprint"] and not r["teacher_id"].startswith("/") for r in rows)
    assert {r["teacher_id"] for r in rows} >= {"local:round0"}


def test_a_stage_is_claimed_by_one_process_at_a_time(tmp_path: Path) -> None:
    script = ("import sys, time; from sublim.runs import Stage; s = Stage(sys.argv[1], 'x', {'a': 1}); "
              "assert s.claim(); print('held', flush=True); time.sleep(float(sys.argv[2])); s.finish({'by': 'child'})")
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), "2"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        st = Stage(tmp_path, "x", {"a": 1})
        assert st.claim(wait=False) is None  # another process holds it
        t0 = time.monotonic()
        assert st.claim() is False  # waited for the holder, which finished it
        assert time.monotonic() - t0 > 0.5 and st.summary() == {"by": "child"}
    finally:
        child.wait(30)
    # a holder that dies releases the stage unfinished: the next claim takes it
    killed = subprocess.Popen([sys.executable, "-c", script.replace("'x'", "'y'"), str(tmp_path), "60"],
                              stdout=subprocess.PIPE, text=True)
    assert killed.stdout is not None and killed.stdout.readline().strip() == "held"
    killed.kill()
    killed.wait(30)
    st = Stage(tmp_path, "y", {"a": 1})
    assert st.claim() is True and not st.done
    with pytest.raises(RuntimeError, match="already claimed by this process"):
        Stage(tmp_path, "y", {"a": 1}).claim()
    release_held()
    assert Stage(tmp_path, "y", {"a": 1}).claim(wait=False) is True
    release_held()


def test_two_processes_share_one_run_directory(tmp_path: Path, tiny_model: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec = _spec(tiny_model)
    spec["seeds"] = [0, 1]
    spec_path.write_text(yaml.safe_dump(spec))
    run = tmp_path / "shared"
    cmd = [sys.executable, "-m", "sublim.cli", "run", str(spec_path), "--out", str(run)]
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with log.open("w") as fh:
            procs.append(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    for p, log in zip(procs, logs, strict=True):
        assert p.wait(300) == 0, log.read_text()[-3000:]
    text = [log.read_text() for log in logs]
    # every stage's work was done by exactly one of the two processes
    for marker in ("[generate]", "[teacher] fine-tuning"):
        lines = [ln for t in text for ln in t.splitlines() if ln.startswith(marker)]
        assert lines and len(lines) == len(set(lines)), lines
    trained = [ln for t in text for ln in t.splitlines() if ln.startswith("[students] training")]
    labels = [x for ln in trained for x in ln.split(": ", 1)[1].split(", ")]
    assert labels and len(labels) == len(set(labels)), labels
    for d in (run / "stages").iterdir():
        assert (d / DONE).exists(), d
        if (d / "rows.jsonl").exists():
            idx = [r["idx"] for r in read_jsonl(d / "rows.jsonl")]
            assert len(idx) == len(set(idx)) == spec["generation"]["n_prompts"], d
