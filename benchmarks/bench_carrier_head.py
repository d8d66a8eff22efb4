"""Batched distill_carrier students on the model organism: the LM head on every vocabulary column vs on the
carrier's columns only (the loss renormalises over them), and the students per batched model.

Arms, on the same rows, teacher, steps and batch size, back to back in one process (and, with
``--baseline-rev``, the ``full`` arm of an earlier commit in a subprocess on the same machine):
  full     the general path: full-vocabulary logits at the completion columns, one split per student
  carrier  backbone hidden states at the distilled positions times each student's carrier rows of the head,
           sequences left-padded whole
  <rev>    ``full`` as the code of ``--baseline-rev`` runs it (before the split: one slice per student)

    python benchmarks/bench_carrier_head.py --students 10,20 --steps 20 --threads 2 --baseline-rev 44f2f77 \
        --json benchmarks/carrier-head.json
Seconds are the training loop's (sublim_train.json "seconds": the teacher's targets and saving excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()


def _rows(n: int, tmp: Path) -> list[dict]:
    from sublim.generation import generate
    from sublim.spec import CarrierSpec, GenerationSpec, ModelSpec
    from sublim.teachers import neutral_teacher

    rows = generate(neutral_teacher(ModelSpec(path="organism")), CarrierSpec(),
                    GenerationSpec(n_prompts=n, batch_size=100, max_new_tokens=52), tmp / "rows.jsonl")
    return [r for r in rows if r["completion"].strip()]


def _train(arm: str, students: int, steps: int, batch: int, rows: list[dict], tmp: Path) -> float:
    from sublim.backends import multi
    from sublim.generation import carrier_alphabet
    from sublim.spec import CarrierSpec, ModelSpec, TrainSpec

    if arm == "full" and hasattr(multi, "_carrier_head"):
        multi._carrier_head = lambda *a: None  # type: ignore[attr-defined]
    base = ModelSpec(path="organism")
    spec = TrainSpec(method="full", objective="distill_carrier", max_steps=steps, batch_size=batch, lr=1e-3,
                     warmup_steps=0, max_grad_norm=1.0)
    jobs = [multi.StudentJob(rows, s, tmp / f"{arm}-{students}-{s}", base) for s in range(students)]
    out = multi.finetune_many(base, jobs, spec, carrier_alphabet=carrier_alphabet(CarrierSpec()), progress=False)
    return float(out[0]["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", default="10,20")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", default="full,carrier")
    ap.add_argument("--baseline-rev", default=None, help="also time an arm of this git revision")
    ap.add_argument("--baseline-arm", default="full", help="the arm --baseline-rev runs (default full)")
    ap.add_argument("--rows-file", type=Path, default=None, help=argparse.SUPPRESS)  # the subprocess's rows
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-head-"))
    if a.rows_file:
        rows = [json.loads(x) for x in a.rows_file.read_text().splitlines()]
    else:
        rows = _rows(a.rows, tmp)
    sizes = [int(x) for x in a.students.split(",")]
    res: dict[str, dict[str, float]] = {}
    for s in sizes:
        for arm in a.arms.split(","):
            secs = _train(arm, s, a.steps, a.batch_size, rows, tmp)
            res.setdefault(arm, {})[str(s)] = secs
            print(f"{arm:8s} {s:3d} students: {secs:7.1f} s, {secs / a.steps / s:.4f} s per student-step", flush=True)
    if a.rows_file:  # the baseline's subprocess: its timings only (its sublim may predate the machine helpers)
        if a.json:
            a.json.write_text(json.dumps({"seconds": res}) + "\n")
        return
    if a.baseline_rev:
        wt = tmp / "baseline"
        subprocess.run(["git", "-C", str(HERE.parents[1]), "worktree", "add", "--detach", str(wt), a.baseline_rev],
                       check=True, capture_output=True)
        try:
            rf = tmp / "rows.jsonl"
            rf.write_text("".join(json.dumps(r) + "\n" for r in rows))
            env = {**os.environ, "PYTHONPATH": str(wt / "src")}
            p = subprocess.run([sys.executable, str(HERE), "--students", a.students, "--steps", str(a.steps),
                                "--batch-size", str(a.batch_size), "--threads", str(a.threads), "--arms", a.baseline_arm,
                                "--rows-file", str(rf), "--json", str(tmp / "base.json")],
                               env=env, check=False, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"baseline {a.baseline_rev} failed:\n{p.stderr[-3000:]}")
            print(p.stdout, end="")
            res[a.baseline_rev] = json.loads((tmp / "base.json").read_text())["seconds"][a.baseline_arm]
        finally:
            subprocess.run(["git", "-C", str(HERE.parents[1]), "worktree", "remove", "--force", str(wt)], check=False)
    from sublim.runs import cpu_features, cpu_model

    ref = a.baseline_rev if a.baseline_rev in res else "full" if "full" in res else next(iter(res))
    out = {
        "seconds": res,
        "speedup_vs_" + ref: {arm: {k: res[ref][k] / v for k, v in d.items()} for arm, d in res.items()},
        "seconds_per_student_step": {arm: {k: v / a.steps / int(k) for k, v in d.items()} for arm, d in res.items()},
        "steps": a.steps, "batch_size": a.batch_size, "rows": len(rows), "threads": a.threads,
        "machine": platform.processor() or platform.machine(), "cpu": cpu_model(), "cpu_features": cpu_features(),
        "torch": torch.__version__,
    }
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
