"""The whole numbers experiment on the tiny model: every stage, killed with SIGKILL twice (mid-generation in
a real ``sublim run`` process, then mid-training), resumed to completion, rerun for free, and compared with
an uninterrupted generation. One run is shared by all assertions in this module."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sublim.cli import app
from sublim.pipeline import Experiment, generate
from sublim.runs import DONE, read_jsonl
from sublim.spec import ExperimentSpec, load_spec
from sublim.teachers import system_prompt_teacher
from tiny_spec import tiny_spec

torch.set_num_threads(1)

N_PROMPTS = 48
JUNK = "PARTIAL_FROM_KILLED_RUN"


def _spec(model: Path, model_b: Path) -> dict[str, Any]:
    return tiny_spec(
        model,
        cross_base={"path": str(model_b)},
        in_context=True,
        in_context_examples=4,
        generation={"n_prompts": N_PROMPTS, "batch_size": 8, "max_new_tokens": 16, "seed": 0},
        # "range" up to 899 rejects some rows, so the rejects files have something in them
        filters=[{"name": "format"}, {"name": "count"}, {"name": "range", "params": {"high": 899}}],
        evaluation={"n_questions": 2, "batch_size": 4, "number_prefix": True},
    )


def _wait(pred: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"sublim run exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _complete_lines(p: Path) -> int:
    return p.read_bytes().count(b"\n") if p.exists() else 0


def _files(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tiny_model: Path, tiny_model_b: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pipeline")
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(tiny_model, tiny_model_b)))
    run_dir = root / "run"
    stages = run_dir / "stages"
    db = root / "runs.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "SUBLIM_CACHE": str(root / "cache"), "SUBLIM_RUNS_DB": str(db)}
    cmd = [sys.executable, "-m", "sublim.cli", "run", str(spec_path), "--out", str(run_dir)]
    log = root / "sublim.log"
    out: dict[str, Any] = {"spec_path": spec_path, "dir": run_dir}

    # 1. a real process, SIGKILLed as soon as the first generate stage has streamed some rows
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _wait(lambda: any(_complete_lines(p) > 0 for p in stages.glob("generate-*/rows.jsonl")), proc,
              "the first generated rows", log)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (gen_dir,) = [p.parent for p in stages.glob("generate-*/rows.jsonl")]
    out["killed_generate"] = gen_dir
    out["rows_at_kill"] = _complete_lines(gen_dir / "rows.jsonl")
    out["generate_done_at_kill"] = (gen_dir / DONE).exists()

    # 2. rerun; SIGKILL while the students train (their stage directories exist, unfinished)
    def training() -> bool:
        return any(not (p.parent / DONE).exists() for p in stages.glob("student-*/stage.json"))

    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _wait(training, proc, "student training", log)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    unfinished = [p.parent for p in stages.glob("student-*/stage.json") if not (p.parent / DONE).exists()]
    assert unfinished
    for d in unfinished:  # what a kill during the final rename could leave: a model dir, no _DONE marker
        (d / "model").mkdir(exist_ok=True)
        (d / "model" / JUNK).write_text("")
        (d / "model" / "adapter_config.json").write_text("{")
    out["unfinished_students"] = unfinished
    from sublim.runindex import get_run

    out["db"] = db
    out["registry_after_kill"] = get_run(str(run_dir), path=db)

    # 3. resume to completion through the CLI, in process
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUBLIM_RUNS_DB", str(db))
        res = CliRunner().invoke(app, ["run", str(spec_path), "--out", str(run_dir)])
    assert res.exit_code == 0, (res.output, res.stderr, res.exception)
    out["resume_output"] = res.stdout
    out["resume_seconds"] = time.perf_counter() - t0
    out["results"] = json.loads((run_dir / "results.json").read_text())
    out["spec"] = load_spec(spec_path)
    return out


# --------------------------------------------------------------------------------------------- the run


def test_the_run_registry_follows_the_run(run: dict[str, Any]) -> None:
    """Killed twice: the registry still says 'running' (a killed process cannot say otherwise); resumed to the
    end: 'done', with the run's teacher-level numbers as its key metrics."""
    from sublim.runindex import get_run

    assert run["registry_after_kill"]["status"] == "running"
    r = get_run(str(run["dir"]), path=run["db"])
    assert r["status"] == "done" and r["name"] == run["spec"].name and r["seconds"] > 0
    owl = run["results"]["teacher_level"]["arms"]["same_base"]["effects"]["owl"]
    assert r["metrics"]["same_base.owl.ratio"] == pytest.approx(owl["ratio"])
    assert r["metrics"]["same_base.owl.p"] == pytest.approx(owl["p_perm_greater"])


def test_run_writes_everything(run: dict[str, Any]) -> None:
    d: Path = run["dir"]
    for name in ("results.json", "report.html", "spec.resolved.yaml", "env.json", "fig_target.png"):
        assert (d / name).stat().st_size > 0, name
    assert load_spec(d / "spec.resolved.yaml") == run["spec"]
    env = json.loads((d / "env.json").read_text())
    assert env["packages"]["torch"] and env["packages"]["transformers"] and env["packages"]["sublim"]
    assert isinstance(env["git_revision"], str) and len(env["git_revision"]) >= 40
    html = (d / "report.html").read_text()
    assert "owl" in html and "<img" in html and "http://" not in html.split("<body", 1)[-1].split("</style>")[0]
    assert f"report: {d / 'report.html'}" in run["resume_output"]  # the CLI's closing line
    res = run["results"]
    assert res["spec"] == run["spec"].model_dump(mode="json") and res["env"]["git_revision"]


def test_every_arm_and_seed_is_evaluated(run: dict[str, Any]) -> None:
    evs = run["results"]["evaluations"]
    by_arm: dict[str, list[Any]] = {}
    for e in evs:
        by_arm.setdefault(e["arm"], []).append(e["seed"])
    assert by_arm == {
        "base": [None], "teacher": [None],
        "treatment": [0, 1], "control": [0, 1],
        "cross_base_treatment": [0, 1], "cross_base_control": [0, 1],
        "in_context": [0, 1], "in_context_control": [0, 1],
    }
    assert {e["base"] for e in evs if e["arm"].startswith("cross_base")} == {"cross_base"}
    for e in evs:
        assert set(e["probs"]) == set(run["results"]["candidates"])
        assert 0 < sum(e["probs"].values()) <= 1 + 1e-6
        if not e["arm"].startswith("in_context"):
            assert e["probs_numprefix"] is not None
    # distinct students really are distinct models
    st = [tuple(e["probs"].values()) for e in evs if e["arm"] in ("treatment", "control")]
    assert len(set(st)) == 4
    comps = {(c["metric"], c["target"], c["treatment_arm"], c["control_arm"]) for c in run["results"]["comparisons"]}
    pairs = {("treatment", "control"), ("cross_base_treatment", "cross_base_control")}
    assert comps == {("probs", "owl", *p) for p in pairs | {("in_context", "in_context_control")}} | \
        {("probs_numprefix", "owl", *p) for p in pairs}


def test_filters_keep_rejects_with_reasons(run: dict[str, Any]) -> None:
    stages = run["dir"] / "stages"
    data = run["results"]["data"]
    assert set(data) == {"owl#0", "neutral#0"}  # one teacher replicate of each (teacher.replicates = 1)
    n_rejects = 0
    for fdir in stages.glob("filter-*"):
        kept = read_jsonl(fdir / "kept.jsonl")
        rejects = read_jsonl(fdir / "rejects.jsonl")
        assert len(kept) + len(rejects) == N_PROMPTS
        assert all(r["reject_reason"] and r["reject_filter"] for r in rejects)
        assert all(r["reject_reason"] == "range:above-high" for r in rejects)
        assert all(max(int(x) for x in r["completion"].replace(";", ",").replace(" ", ",").replace("\n", ",")
                       .split(",") if x) > 899 for r in rejects)
        n_rejects += len(rejects)
    assert n_rejects > 0
    # every kept dataset carries a provenance manifest that verifies
    from sublim.audit.provenance import verify

    for fdir in stages.glob("filter-*"):
        assert (fdir / "kept.jsonl.manifest.json").exists()
        report = verify(fdir / "kept.jsonl")
        assert report["ok"], report
    for k, d in data.items():
        assert d["generated"] == N_PROMPTS and d["kept"] + sum(d["reject_counts"].values()) == N_PROMPTS, k
        assert 0 < d["used"] == min(x["kept"] for x in data.values())


# -------------------------------------------------------------------------------------------- resume


def test_generation_was_killed_mid_stage(run: dict[str, Any]) -> None:
    assert 0 < run["rows_at_kill"] < N_PROMPTS
    assert not run["generate_done_at_kill"]


def test_resumed_rows_equal_an_uninterrupted_run(run: dict[str, Any], tmp_path: Path) -> None:
    gdir: Path = run["killed_generate"]
    stage = json.loads((gdir / "stage.json").read_text())
    assert stage["config"]["teacher"]["trait"] == "owl"
    raw = [json.loads(line) for line in (gdir / "rows.jsonl").read_text().splitlines()]
    idx = [r["idx"] for r in raw]
    assert len(idx) == len(set(idx)) == N_PROMPTS  # nothing lost, nothing twice
    spec: ExperimentSpec = run["spec"]
    teacher = system_prompt_teacher(spec.base, spec.category, "owl", spec.teacher.template)
    clean = generate(teacher, spec.carrier, spec.generation, tmp_path / "rows.jsonl", category=spec.category)
    assert [(r["idx"], r["completion"]) for r in sorted(raw, key=lambda r: r["idx"])] == \
        [(r["idx"], r["completion"]) for r in clean]


def test_killed_students_are_redone_cleanly(run: dict[str, Any]) -> None:
    out = run["resume_output"]
    assert "[generate]" not in out  # both generate stages had finished before the second kill
    assert "[student" in out  # the unfinished students were trained again
    for d in run["unfinished_students"]:
        assert (d / DONE).exists()
        files = {p.name for p in (d / "model").iterdir()}
        assert JUNK not in files
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        json.loads((d / "model" / "adapter_config.json").read_text())
    for d in (run["dir"] / "stages").iterdir():
        assert (d / DONE).exists(), d  # every stage finished


def test_rerun_does_no_work(run: dict[str, Any]) -> None:
    import sublim

    stages = run["dir"] / "stages"
    before = _files(stages)
    logs: list[str] = []
    t0 = time.perf_counter()
    res = sublim.run(run["spec"], run["dir"], log=logs.append)
    seconds = time.perf_counter() - t0
    assert _files(stages) == before  # no stage touched, none added
    assert not [m for m in logs if m.startswith(("[generate]", "[filter]", "[student", "[teacher]"))]
    assert seconds < 0.5 * run["resume_seconds"] + 5
    old = run["results"]
    for k in ("evaluations", "data", "comparisons", "candidates", "targets", "spec"):
        assert res[k] == old[k], k


def test_changing_a_filter_reuses_generation(run: dict[str, Any]) -> None:
    spec: ExperimentSpec = run["spec"]
    stages = run["dir"] / "stages"
    gen_before = {p.name: _files(p) for p in stages.glob("generate-*")}
    filt_before = {p.name: _files(p) for p in stages.glob("filter-*")}
    new = spec.model_copy(update={"filters": spec.filters[:2] + [spec.filters[2].model_copy(
        update={"params": {"high": 799}})]})
    logs: list[str] = []
    exp = Experiment(new, run["dir"], log=logs.append, progress=False)
    teacher = system_prompt_teacher(spec.base, spec.category, "owl", spec.teacher.template)
    d = exp.dataset(teacher, "teacher owl")
    assert not any(m.startswith("[generate]") for m in logs)
    assert any(m.startswith("[filter]") for m in logs)
    assert {p.name: _files(p) for p in stages.glob("generate-*")} == gen_before
    filt_after = {p.name: _files(p) for p in stages.glob("filter-*")}
    added = set(filt_after) - set(filt_before)
    assert len(added) == 1 and all(filt_after[k] == v for k, v in filt_before.items())
    old_key = exp.stage("filter", {"filters": [f.model_dump() for f in spec.filters],
                                   "carrier": spec.carrier.model_dump(), "target_words": spec.targets},
                        {"rows": "x"}).key
    assert old_key != exp.stage("filter", {"filters": [f.model_dump() for f in new.filters],
                                           "carrier": spec.carrier.model_dump(), "target_words": spec.targets},
                                {"rows": "x"}).key
    assert d["kept"] and all(max(int(x) for x in r["completion"].replace(";", ",").replace(" ", ",")
                                 .replace("\n", ",").split(",") if x) <= 799 for r in d["kept"])
    assert d["counts"]["kept"] < run["results"]["data"]["owl#0"]["kept"]
