"""The students of an experiment: one cached stage per student, trained as batched models.

:class:`StudentStages` is the part of :class:`sublim.pipeline.Experiment` that keys, claims and trains the
students (and traces the theorem for the chosen ones); the experiment supplies ``spec``, ``dir``, ``log``,
``progress``, :meth:`stage`, :meth:`_fp` and :meth:`_alphabet`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sublim.runs import Stage, atomic_write_json, hash_obj
from sublim.spec import ExperimentSpec, ModelSpec, TrainSpec
from sublim.teachers import Teacher, implant_rows

if TYPE_CHECKING:
    from sublim.generation import Log


class StudentStages:
    """Student stages of an experiment (a mixin of :class:`sublim.pipeline.Experiment`)."""

    spec: ExperimentSpec
    log: Log
    progress: bool | None

    if TYPE_CHECKING:  # provided by Experiment
        def stage(self, name: str, config: Any, inputs: dict[str, str] | None = None) -> Stage: ...
        def _fp(self, m: ModelSpec) -> str: ...
        def _alphabet(self) -> frozenset[str] | None: ...

    def student_stage(self, base: ModelSpec, rows: list[dict], seed: int, teacher: Teacher | None,
                      train: TrainSpec) -> Stage:
        cfg = {"student": train.model_dump(mode="json", exclude={"parallel_students"}), "seed": seed,
               "teacher": teacher.describe() if teacher and train.objective != "sft" else None}
        return self.stage("student", cfg, {"base": self._fp(base), "rows": hash_obj([r["content_hash"] for r in rows])})

    def students(self, jobs: list[dict[str, Any]], train: TrainSpec) -> None:
        """Train every student not already finished. Students of one base and recipe (``train``, or a job's own
        ``"train"``: a student-side defence) are trained together as one batched model, ``parallel_students`` at
        a time (fewer for full fine-tunes if their weights and optimiser state would not fit in half the machine's
        memory); each is exactly a separate fine-tune."""
        # claim each unfinished student; one another process holds is trained there: wait for it at the end
        todo, elsewhere, seen = [], [], set()
        for j in jobs:
            st = j["stage"]
            if st.key in seen or st.done:  # the same student twice in one run is trained once
                continue
            seen.add(st.key)
            got = st.claim(wait=False)
            if got:
                todo.append(j)
            elif got is None:
                elsewhere.append(j)
        self._train(todo, train)
        for j in elsewhere:  # finished by the other process, or claimed here if it died meanwhile
            if j["stage"].claim():
                self.log(f"[students] {j['label']} s{j['seed']}: its other process stopped; training it here")
                self._train([j], train)

    def _train(self, todo: list[dict[str, Any]], train: TrainSpec) -> None:
        """Train the claimed students ``todo`` (grouped by base and recipe) and finish their stages."""
        from sublim.backends.multi import StudentJob, finetune_many

        if not todo:
            return
        alphabet = self._alphabet()
        by_base: dict[str, list[dict[str, Any]]] = {}
        from sublim.backends.train import total_steps

        for j in todo:
            tr = j.get("train", train)  # one batched model: one base, one recipe, one number of steps
            key = f"{j['base'].model_dump_json()}|{tr.model_dump_json()}|{total_steps(len(j['rows']), tr)}"
            by_base.setdefault(key, []).append(j)
        outer = train
        for group in by_base.values():
            base = group[0]["base"]
            train = group[0].get("train", outer)
            width = train.parallel_students
            if train.method == "full":
                width = max(1, min(width, _full_students_that_fit(base)))
            for i in range(0, len(group), width):
                chunk = group[i: i + width]
                self.log(f"[students] training {len(chunk)} {train.method} {train.objective} student(s) at once: "
                         + ", ".join(f"{j['label']} s{j['seed']}" for j in chunk))
                sjobs = [StudentJob(j["rows"], j["seed"], j["stage"].dir / "model",
                                    j["teacher"].model if j["teacher"] else None,
                                    j["teacher"].system if j["teacher"] else None, j["label"]) for j in chunk]
                trace = self._trace(base, chunk)
                sums = finetune_many(base, sjobs, train, carrier_alphabet=alphabet, progress=self.progress,
                                     desc=f"{len(chunk)} students", on_step=trace)
                if trace is not None:
                    for st in trace.students:
                        atomic_write_json(chunk[st.index]["stage"].dir / "theorem.json",
                                          {"label": st.label, "points": st.points})
                for j, summ in zip(chunk, sums, strict=True):
                    j["stage"].finish({k: v for k, v in summ.items() if k != "losses"})

    def _trace(self, base: ModelSpec, chunk: list[dict[str, Any]]) -> Any:
        """The theorem trace for the chunk's traced students (``theorem_every``), or None."""
        from sublim.theorem import TheoremTrace, TracedStudent

        s = self.spec
        picked = [(i, j) for i, j in enumerate(chunk) if j.get("trace")]
        if not s.theorem_every or not picked or s.student.method != "full":
            return None
        students = [TracedStudent(i, j["label"], j["trace"].model, s.base,
                                  implant_rows(s.category, j["trace"].trait, s.teacher)) for i, j in picked]
        return TheoremTrace(base, students, s.theorem_every)


def _full_students_that_fit(base: ModelSpec) -> int:
    """How many full fine-tunes of ``base`` fit in half of physical memory at ~16 bytes per parameter
    (float32 weights, gradients and two Adam moments)."""
    from sublim.models import resolve_path

    try:
        cfg = json.loads((Path(resolve_path(base)) / "config.json").read_text())
        h, n_layers, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
        inter = cfg.get("intermediate_size", 4 * h)
        n_params = v * h + n_layers * (4 * h * h + 3 * h * inter)
    except (OSError, KeyError, ValueError):
        return 1
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(mem * 0.5 // (16 * n_params))
