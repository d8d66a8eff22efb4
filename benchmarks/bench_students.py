"""Student training throughput on the model organism: separate fine-tunes vs many students as one batched model.

Arms, same rows, teacher, steps and batch size, run back to back in one process:
  loop      N students one after another with `sublim.backends.train.finetune` (the teacher's forward pass each step)
  cached    N students one after another with `finetune_many([job])` (the teacher's targets computed once per row)
  batched   the N students at once with `finetune_many(jobs)` (stacked weights, one forward/backward per step)

    python benchmarks/bench_students.py --students 10 --steps 20 --threads 2 --json benchmarks/students.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from sublim.backends.multi import StudentJob, finetune_many
    from sublim.backends.train import finetune
    from sublim.generation import carrier_alphabet, generate
    from sublim.spec import CarrierSpec, GenerationSpec, ModelSpec, TrainSpec
    from sublim.teachers import neutral_teacher

    base = ModelSpec(path="organism")
    tmp = Path(tempfile.mkdtemp(prefix="bench-students-"))
    rows = generate(
        neutral_teacher(base),
        CarrierSpec(),
        GenerationSpec(n_prompts=a.rows, batch_size=100, max_new_tokens=52),
        tmp / "rows.jsonl",
    )
    rows = [r for r in rows if r["completion"].strip()]
    alphabet = carrier_alphabet(CarrierSpec())
    spec = TrainSpec(
        method="full",
        objective="distill_carrier",
        max_steps=a.steps,
        batch_size=a.batch_size,
        lr=1e-3,
        warmup_steps=0,
    )
    teacher = base  # the cost of a distillation step does not depend on which teacher it is
    out: dict[str, float] = {}

    t = time.perf_counter()
    for s in range(a.students):
        finetune(
            base,
            rows,
            spec,
            tmp / f"loop{s}",
            seed=s,
            teacher=teacher,
            carrier_alphabet=alphabet,
            progress=False,
        )
    out["loop"] = time.perf_counter() - t
    t = time.perf_counter()
    for s in range(a.students):
        finetune_many(
            base,
            [StudentJob(rows, s, tmp / f"cached{s}", teacher)],
            spec,
            carrier_alphabet=alphabet,
            progress=False,
        )
    out["cached"] = time.perf_counter() - t
    t = time.perf_counter()
    finetune_many(
        base,
        [StudentJob(rows, s, tmp / f"batched{s}", teacher) for s in range(a.students)],
        spec,
        carrier_alphabet=alphabet,
        progress=False,
    )
    out["batched"] = time.perf_counter() - t
    res = {
        "seconds": out,
        "speedup_vs_loop": {k: out["loop"] / v for k, v in out.items()},
        "students": a.students,
        "steps": a.steps,
        "batch_size": a.batch_size,
        "rows": len(rows),
        "threads": a.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(res, indent=1))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
