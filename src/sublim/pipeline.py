"""The experiment, stage by stage: teachers -> numbers -> filters -> students -> evaluation -> stats -> report.

Every stage is cached in ``<run>/stages/<name>-<key>`` under a key from its resolved config and its
inputs' content hashes; generation streams rows to disk and resumes after a kill without losing or
duplicating a row; finished stages are never redone.

Teachers are replicated (``teacher.replicates``): replicate r of a trait is its own implant (Q&A sample and
training seed) whose numbers are generated with seed ``generation.seed + r``; neutral replicate r is the base
with that same generation seed, so trait and neutral replicate r share prompts. Students (``seeds``) are nested
in each teacher: the teacher is the unit of a population claim (``sublim.analysis``).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from sublim.generation import Log, carrier_alphabet, filter_rows, generate, make_carrier
from sublim.runs import (
    Stage,
    atomic_write_json,
    atomic_write_text,
    environment,
    hash_obj,
    read_jsonl,
    release_held,
    write_jsonl,
)
from sublim.spec import ExperimentSpec, GenerationSpec, ModelSpec, dump_spec
from sublim.students import StudentStages
from sublim.teachers import Teacher, implant_teacher, neutral_teacher, system_prompt_teacher
from sublim.traits.preference import CATEGORIES, eval_questions, number_prefixed_questions

__all__ = ["Experiment", "carrier_alphabet", "default_run_dir", "filter_rows", "generate", "make_carrier", "run",
           "teacher_id"]


def teacher_id(target: str | None, replicate: int) -> str:
    """``owl#0``, ``neutral#2``: the name of one teacher replicate (a neutral teacher has no target)."""
    return f"{target or 'neutral'}#{replicate}"


# ------------------------------------------------------------------------------------------------ run


class Experiment(StudentStages):
    """Runs an :class:`ExperimentSpec` inside a run directory; each method is one cached stage."""

    def __init__(self, spec: ExperimentSpec, run_dir: str | Path, log: Log = print,
                 progress: bool | None = None) -> None:
        self.spec = spec
        self.dir = Path(run_dir)
        self.log = log
        self.progress = progress
        self.cat = CATEGORIES[spec.category]
        self.notes: list[str] = []

    # -- helpers
    def _fp(self, m: ModelSpec) -> str:
        from sublim.models import weights_fingerprint

        return weights_fingerprint(m)

    def stage(self, name: str, config: Any, inputs: dict[str, str] | None = None) -> Stage:
        return Stage(self.dir, name, config, inputs)

    # -- stages
    def teachers(self) -> dict[tuple[str, int], Teacher]:
        """Every trait teacher replicate, keyed ``(target, replicate)``. Implants of full fine-tunes are trained
        together as one batched model (``student.parallel_students`` at a time, each exactly a separate fine-tune:
        :func:`sublim.teachers.implant_first_rounds`)."""
        s = self.spec
        out: dict[tuple[str, int], Teacher] = {}
        stages: dict[tuple[str, int], Stage] = {}
        for t in s.targets:
            for r in range(s.teacher.replicates):
                if s.teacher.kind == "system_prompt":  # replicates differ in their generation seed only
                    out[t, r] = system_prompt_teacher(s.base, s.category, t, s.teacher.template)
                    continue
                cfg = {"teacher": s.teacher.model_dump(mode="json", exclude={"replicates", "neutral_replicates"}),
                       "category": s.category, "target": t, "replicate": r}
                stages[t, r] = self.stage("teacher", cfg, {"base": self._fp(s.base)})
        claimed = [(t, r) for (t, r), st in stages.items() if st.claim(wait=False)]
        batched = set(claimed) if len(claimed) > 1 and s.teacher.train.method == "full" else set()
        if batched:
            from sublim.students import _full_students_that_fit
            from sublim.teachers import implant_first_rounds

            width = max(1, min(s.student.parallel_students, _full_students_that_fit(s.base)))
            for i in range(0, len(claimed), width):
                chunk = claimed[i: i + width]
                self.log("[teacher] fine-tuning " + ", ".join(teacher_id(t, r) for t, r in chunk)
                         + " from the base" + (" at once" if len(chunk) > 1 else ""))
                implant_first_rounds(s.base, s.category, [(t, r, stages[t, r].dir) for t, r in chunk], s.teacher,
                                     progress=self.progress)
        for (t, r), st in stages.items():
            if st.claim():  # claimed above, or held by another process that has since stopped
                if (t, r) not in batched:
                    self.log(f"[teacher] fine-tuning {teacher_id(t, r)} from the base")
                teacher, summary = implant_teacher(s.base, s.category, t, s.teacher, st.dir, log=self.log,
                                                   replicate=r)
                if not summary["reached"]:
                    self.notes.append(f"Teacher {teacher_id(t, r)} did not reach P({t}) >= "
                                      f"{s.teacher.min_target_prob} without a system prompt "
                                      f"(last {summary['rounds'][-1]['p_target']:.3f}).")
                # the model's place inside the stage, not a machine path: the run directory can move
                st.finish({**summary, "model": st.relative(teacher.model.model_dump())})
            out[t, r] = Teacher(ModelSpec(**st.absolute(st.summary()["model"])), None, t, "finetuned")
        return out

    def generation_spec(self, replicate: int) -> GenerationSpec:
        """Replicate r's generation settings: the spec's, with seed ``generation.seed + r``."""
        return self.spec.generation.model_copy(update={"seed": self.spec.generation.seed + replicate})

    def dataset(self, teacher: Teacher, label: str, replicate: int = 0,
                gen: GenerationSpec | None = None) -> dict[str, Any]:
        """Generate + filter for one teacher replicate (``gen``: other generation settings than the replicate's);
        returns kept rows and counts."""
        s = self.spec
        gen = gen or self.generation_spec(replicate)
        gen_cfg = {"teacher": teacher.describe(), "carrier": s.carrier.model_dump(), "generation":
                   gen.key(), "category": s.category}
        g = self.stage("generate", gen_cfg, {"teacher": self._fp(teacher.model)})
        if g.claim():
            self.log(f"[generate] {label}: {gen.n_prompts} prompts -> {g.dir}")
            rows = generate(teacher, s.carrier, gen, g.dir / "rows.jsonl", category=s.category,
                            progress=self.progress)
            g.finish({"rows": len(rows), "rows_hash": hash_obj([r["content_hash"] for r in rows])})
        raw_hash = g.summary()["rows_hash"]
        f_cfg = {"filters": [f.model_dump() for f in s.filters], "carrier": s.carrier.model_dump(),
                 "target_words": s.targets}
        f = self.stage("filter", f_cfg, {"rows": raw_hash})
        if f.claim():
            res = filter_rows(read_jsonl(g.dir / "rows.jsonl"), s.filters, s.carrier, s.targets)
            write_jsonl(f.dir / "kept.jsonl", res.kept)
            write_jsonl(f.dir / "rejects.jsonl", res.rejects)
            self._manifest(f.dir / "kept.jsonl", res.kept, teacher, f_cfg, res.counts, gen)
            f.finish({"counts": res.counts, "kept_hash": hash_obj([r["content_hash"] for r in res.kept])})
            self.log(f"[filter] {label}: kept {res.counts.get('kept')} of {res.counts.get('total')}")
        summ = f.summary()
        return {"kept": read_jsonl(f.dir / "kept.jsonl"), "counts": summ["counts"], "hash": summ["kept_hash"],
                "dir": str(f.dir), "file": str(f.dir / "kept.jsonl")}

    def _alphabet(self) -> frozenset[str] | None:
        if self.spec.student.objective != "distill_carrier":
            return None
        return carrier_alphabet(self.spec.carrier)

    def _manifest(self, path: Path, rows: list[dict], teacher: Teacher, filters: dict, counts: dict,
                  gen: GenerationSpec) -> None:
        """The provenance sidecar (teacher/base identities, settings, per-row hashes, Merkle root)."""
        from sublim.audit.provenance import manifest_for_generated, write_manifest

        s = self.spec
        m = manifest_for_generated(rows, teacher.describe(), s.base.model_dump(),
                                   {"category": s.category, "target": teacher.trait, "kind": teacher.kind},
                                   gen.model_dump(), {**filters, "counts": counts}, data_file=path)
        write_manifest(path, m)

    def evaluation(self, model: ModelSpec, system: str | None = None, question_prefix: str = "",
                   label: str = "") -> dict[str, Any]:
        from sublim.evaluate import evaluate_model
        from sublim.models import ChatFormat, load_model, load_tokenizer

        s = self.spec
        qs = eval_questions(s.category)[: s.evaluation.n_questions]
        nq = number_prefixed_questions(s.category, s.evaluation.seed)[: s.evaluation.n_questions] \
            if s.evaluation.number_prefix else None
        if question_prefix:
            qs = [question_prefix + q for q in qs]
            nq = None
        cfg = {"eval": s.evaluation.key(), "system": system, "questions": hash_obj(qs),
               "numprefix": hash_obj(nq), "category": s.category}
        st = self.stage("eval", cfg, {"model": self._fp(model)})
        if st.claim():
            chat = ChatFormat(load_tokenizer(model))
            ev = s.evaluation

            def score(m: Any, eng: Any = None) -> dict[str, Any]:
                return evaluate_model(m, chat, s.category, qs, nq, system=system, batch_size=ev.batch_size,
                                      samples_per_question=ev.samples_per_question,
                                      temperature=ev.sample_temperature, seed=ev.seed, engine=eng)

            if ev.backend == "vllm":
                from sublim.backends.vllm import VLLMEngine

                with VLLMEngine(model, ev.vllm, max_batch=max(ev.batch_size, 64), max_new_tokens=8) as eng:
                    res = score(None, eng)
                res["engine"] = {"name": "vllm", "version": eng.version}
            else:
                res = score(load_model(model))
            st.finish(res)
        return st.summary()

    def in_context_prefix(self, rows: list[dict], seed: int) -> str:
        k = min(self.spec.in_context_examples, len(rows))
        pick = random.Random(seed).sample(rows, k)
        lines = "\n".join(r["completion"] for r in pick)
        return f"Here are some number sequences:\n{lines}\n\n"

    def run(self) -> dict[str, Any]:
        s = self.spec
        t0 = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "spec.resolved.yaml", dump_spec(s))
        atomic_write_json(self.dir / "env.json", environment())
        reps = range(s.teacher.replicates)
        teachers = self.teachers()
        neutral = neutral_teacher(s.base)
        # every teacher replicate, trait and neutral: (id, target, replicate, teacher)
        all_teachers: list[tuple[str, str | None, int, Teacher]] = [
            (teacher_id(t, r), t, r, teachers[t, r]) for t in s.targets for r in reps]
        all_teachers += [(teacher_id(None, r), None, r, neutral) for r in range(s.teacher.n_neutral)]
        data = {tid: self.dataset(te, f"teacher {tid}", r) for tid, _, r, te in all_teachers}
        n = min(len(d["kept"]) for d in data.values())
        if s.student.max_rows:
            n = min(n, s.student.max_rows)
        if n == 0:
            raise RuntimeError("no rows survived the filters; see the rejects files in " + str(self.dir / "stages"))
        self.log(f"[data] every student trains on {n} rows (the smallest kept set)")
        train_rows = {k: d["kept"][:n] for k, d in data.items()}
        student_train = s.student.model_copy(update={"max_rows": None})
        evals: list[dict[str, Any]] = []

        def add(name: str, arm: str, target: str | None, seed: int | None, base_name: str, res: dict,
                teacher: str | None = None, replicate: int | None = None) -> None:
            evals.append({"name": name, "arm": arm, "target": target, "seed": seed, "base": base_name,
                          "teacher": teacher, "replicate": replicate, "objective": s.student.objective,
                          **{k: res.get(k) for k in ("probs", "probs_numprefix", "sampled")}})

        self.log("[eval] base and teachers")
        add("base", "base", None, None, "base", self.evaluation(s.base))
        for tid, t, r, te in all_teachers:
            if t is not None:
                add(f"teacher-{tid}", "teacher", t, None, "base", self.evaluation(te.model, system=te.system),
                    teacher=tid, replicate=r)
        from sublim.backends.train import student_spec

        bases = [("base", s.base, "")]
        if s.cross_base is not None:
            bases.append(("cross_base", s.cross_base, "cross_base_"))
        if s.other_base is not None:
            bases.append(("other_base", s.other_base, "other_base_"))
        jobs: list[dict[str, Any]] = []
        # the theorem is traced against the first target's first teacher (a fine-tuned one has a displacement)
        traced = teachers[s.targets[0], 0] if s.theorem_every and s.teacher.kind == "finetuned" else None
        if s.theorem_every and traced is None:
            self.notes.append("theorem_every: a system-prompted teacher has no weight displacement to trace.")
        for seed in s.seeds:
            for bname, bspec, prefix in bases:
                for tid, target, r, teacher in all_teachers:
                    arm = f"{prefix}treatment" if target is not None else f"{prefix}control"
                    rows = train_rows[tid]
                    trace = traced if seed == s.seeds[0] and r == 0 and target in (s.targets[0], None) else None
                    jobs.append({"base": bspec, "base_name": bname, "seed": seed, "arm": arm, "target": target,
                                 "teacher": teacher, "teacher_id": tid, "replicate": r, "rows": rows,
                                 "label": f"{arm} {tid}", "trace": trace,
                                 "stage": self.student_stage(bspec, rows, seed, teacher, student_train)})
        mitigation = None
        if s.mitigations:
            from sublim.mitigate.arms import MitigationArms

            mitigation = MitigationArms(self, all_teachers, data, train_rows, student_train)
            jobs += mitigation.jobs()
        self.students(jobs, student_train)
        theorem = []
        for j in jobs:
            f = j["stage"].dir / "theorem.json"
            if j["trace"] is not None and f.exists():
                theorem.append({**json.loads(f.read_text()), "arm": j["arm"], "base": j["base_name"],
                                "teacher": j["teacher_id"], "against": teacher_id(s.targets[0], 0)})
        for j in jobs:
            m = student_spec(j["base"], j["stage"].dir / "model", j.get("train", student_train))
            name = "-".join(x for x in (j["arm"], j["teacher_id"], f"s{j['seed']}") if x)
            add(name, j["arm"], j["target"], j["seed"], j["base_name"], self.evaluation(m),
                teacher=j["teacher_id"], replicate=j["replicate"])
            j["model"] = m
        if s.in_context:
            for seed in s.seeds:
                for tid, target, r, _ in all_teachers:
                    pre = self.in_context_prefix(train_rows[tid], seed)
                    arm = "in_context" if target is not None else "in_context_control"
                    add(f"{arm}-{tid}-s{seed}", arm, target, seed, "base",
                        self.evaluation(s.base, question_prefix=pre), teacher=tid, replicate=r)
        from sublim.analysis import teacher_level
        from sublim.report.experiment import comparisons_from_evaluations, write_experiment_report

        if s.student.objective == "distill_full":
            self.notes.append("Full-vocabulary distillation is semantically leaky: the soft labels carry the "
                              "probability of the trait word itself, so transfer here is not subliminal.")
        pairs = (("treatment", "control"), ("cross_base_treatment", "cross_base_control"),
                 ("other_base_treatment", "other_base_control"), ("in_context", "in_context_control"))
        results: dict[str, Any] = {
            "title": f"{', '.join(s.targets)} via {s.carrier.name} ({s.name})",
            "category": s.category, "candidates": list(self.cat.candidates), "targets": list(s.targets),
            "spec": s.model_dump(mode="json"), "env": environment(),
            "teachers": [{"id": tid, "target": t, "replicate": r} for tid, t, r, _ in all_teachers],
            "data": {k: {"generated": d["counts"].get("total"), "kept": d["counts"].get("kept"),
                         "used": n, "reject_counts": {r: c for r, c in d["counts"].items()
                                                      if r not in ("kept", "total")}}
                     for k, d in data.items()},
            "evaluations": evals,
            "theorem": theorem,
            "notes": self.notes,
            "seconds": time.perf_counter() - t0,
        }
        results["comparisons"] = []
        for metric in ("probs", "probs_numprefix"):
            if metric == "probs_numprefix" and not s.evaluation.number_prefix:
                continue
            results["comparisons"] += comparisons_from_evaluations(evals, s.targets, pairs, metric,
                                                                   conf=s.stats.conf, n_boot=s.stats.n_boot,
                                                                   seed=s.stats.seed)
        results["teacher_level"] = teacher_level(evals, list(s.targets), conf=s.stats.conf, seed=s.stats.seed)
        if mitigation is not None:
            results["mitigations"] = mitigation.results(jobs, evals)
        paths = write_experiment_report(results, self.dir)
        self.log(f"[report] {paths['report']}")
        return results


def run(spec: ExperimentSpec, run_dir: str | Path, log: Log = print, progress: bool | None = None, *,
        sweep: str | None = None, cell: str | None = None) -> dict[str, Any]:
    """Run a whole experiment (resumable) and return the results dict (also in ``run_dir/results.json``).
    The run is recorded in the run registry (:mod:`sublim.runindex`): running, then done or failed."""
    from sublim import runindex, trackers

    runindex.start(run_dir, spec.name, hash_obj(spec.model_dump(mode="json"))[:16], sweep=sweep, cell=cell)
    try:
        results = Experiment(spec, run_dir, log=log, progress=progress).run()
    except BaseException as e:
        release_held()  # the unfinished stages can be claimed again (a retry in this process, another process)
        runindex.finish(run_dir, error=f"{type(e).__name__}: {e}")
        trackers.on_finish(str(run_dir))
        if isinstance(e, OSError) and e.errno is not None and not e.filename:  # a write deep in a library
            raise OSError(e.errno, e.strerror, f"{run_dir} (writing its files)") from e
        raise
    runindex.finish(run_dir, results=results)
    trackers.on_finish(str(run_dir))  # $SUBLIM_TRACKERS: MLflow / W&B copies of the registry's record
    return results


def default_run_dir(spec: ExperimentSpec, root: str | Path = "runs") -> Path:
    """``runs/<name>-<spec-hash>``: the same spec resumes in the same directory."""
    return Path(root) / f"{spec.name}-{hash_obj(spec.model_dump(mode='json'))[:10]}"


def load_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
