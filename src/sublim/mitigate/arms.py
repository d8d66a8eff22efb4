"""A spec's ``mitigations:`` as experiment arms: each defence gives a treatment and a control arm on the base
(``<label>:treatment`` / ``<label>:control``), the same teachers, seeds and row count rule as the unmitigated
arms, the defence applied identically to the treatment and to the control data.

- data-side: every teacher replicate's kept rows go through the defence in a cached ``mitigate`` stage that writes
  the mitigated rows with a provenance manifest naming the filter stage's file as its parent; the students of an
  arm then train on the smallest mitigated count (a row-level defence drops rows);
- student-side: the students train with the changed recipe (and, for ``other-init``, from another base);
- generation-time: every teacher (trait and neutral) generates again with the changed sampling, then the filters.

After the students are evaluated, :meth:`MitigationArms.results` measures each treatment student's costs (KL to
its teacher on fresh number prompts, held-out chat loss, persona following) and hands everything to
:func:`sublim.mitigate.measure.analyse`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sublim.mitigate.registry import get
from sublim.models import model_identity
from sublim.runs import hash_obj, read_jsonl
from sublim.spec import MitigationSpec, ModelSpec, TrainSpec

FRESH_SEED = 900_000     # generation seed (+ replicate) of the fresh number prompts the distillation cost uses
FRESH_PROMPTS = 100


class MitigationArms:
    """Builds the mitigation arms' student jobs for an :class:`sublim.pipeline.Experiment` and measures them."""

    def __init__(self, exp: Any, teachers: list[tuple[str, str | None, int, Any]], data: dict[str, dict[str, Any]],
                 train_rows: dict[str, list[dict[str, Any]]], train: TrainSpec) -> None:
        self.exp, self.teachers, self.data, self.train_rows, self.train = exp, teachers, data, train_rows, train
        self.spec = exp.spec
        self.info: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------- jobs
    def jobs(self) -> list[dict[str, Any]]:
        s = self.spec
        jobs: list[dict[str, Any]] = []
        for m in s.mitigations:
            d = get(m.name)
            p = d.resolve(m.params)
            label = m.arm_label
            base, tr, rows, changes = s.base, self.train, self.train_rows, {}
            if d.kind == "train":
                tr, other = d.apply(self.train, p)
                base = other or s.base
            elif d.kind == "generation":
                rows = {}
                for tid, _, r, te in self.teachers:
                    gen = d.apply(self.exp.generation_spec(r), p)
                    rows[tid] = self.exp.dataset(te, f"{label} {tid}", r, gen=gen)["kept"]
                rows = self._trim(rows, label)
            else:
                rows = {}
                for tid, target, r, te in self.teachers:
                    rows[tid], changes[tid] = self._mitigated(m, p, tid, target, r, te)
                rows = self._trim(rows, label)
            self.info.append({"label": label, "name": m.name, "kind": d.kind, "params": p, "summary": d.summary,
                              "base": base.model_dump(), "train": tr.model_dump(mode="json"),
                              "rows": len(next(iter(rows.values()))), "changes": changes})
            bname = "base" if base == s.base else "other_init"
            relabel = None
            if p.get("relabel") and tr.objective != "sft":  # the other family gives the soft labels too
                from sublim.teachers import neutral_teacher

                relabel = neutral_teacher(ModelSpec(path=p["model"]))
            for seed in s.seeds:
                for tid, target, r, te in self.teachers:
                    arm = f"{label}:{'treatment' if target is not None else 'control'}"
                    teach = relabel or te
                    jobs.append({"base": base, "base_name": bname, "seed": seed, "arm": arm, "target": target,
                                 "teacher": teach, "cost_teacher": te, "teacher_id": tid, "replicate": r,
                                 "rows": rows[tid], "label": f"{arm} {tid}", "trace": None, "train": tr,
                                 "mitigation": label, "stage": self.exp.student_stage(base, rows[tid], seed, teach, tr)})
        return jobs

    def _trim(self, rows: dict[str, list[dict[str, Any]]], label: str) -> dict[str, list[dict[str, Any]]]:
        n = min(len(v) for v in rows.values())
        if self.spec.student.max_rows:
            n = min(n, self.spec.student.max_rows)
        if n == 0:
            raise RuntimeError(f"mitigation {label!r}: no rows left for some teacher")
        return {k: v[:n] for k, v in rows.items()}

    def _mitigated(self, m: MitigationSpec, p: dict[str, Any], tid: str, target: str | None, r: int,
                   te: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One teacher's rows through a data-side defence (cached stage with a provenance manifest)."""
        from sublim.mitigate.apply import Context, mitigate, write_mitigated

        s = self.spec
        rows = self.train_rows[tid]
        # counterfactual teachers for divergence scores: the other targets' teachers of the same replicate
        decoys = [(t.model, t.system) for t2, tg, r2, t in self.teachers if tg is not None and tg != target and r2 == r]
        ctx = Context(student=s.base, teacher=te.model, teacher_system=te.system, decoys=decoys, carrier=s.carrier,
                      seed=s.generation.seed + r, generation=s.generation)
        cfg = {"defence": m.name, "params": p, "teacher": te.describe(), "seed": ctx.seed,
               "decoys": [[model_identity(x), y] for x, y in decoys], "carrier": s.carrier.model_dump()}
        if s.generation.engine_name != "hf":  # a regenerating defence samples with that engine (hf: the old keys)
            cfg["engine"] = s.generation.engine_name
        st = self.exp.stage("mitigate", cfg, {"rows": hash_obj([x["content_hash"] for x in rows]),
                                              "base": self.exp._fp(s.base)})
        if st.claim():
            self.exp.log(f"[mitigate] {m.arm_label}: {tid} ({len(rows)} rows)")
            res = mitigate(rows, m.name, p, ctx)
            write_mitigated(st.dir / "rows.jsonl", res, Path(self.data[tid]["file"]), rows, ctx)
            st.finish({"changes": res.changes, "rows": len(res.rows)})
        return read_jsonl(st.dir / "rows.jsonl"), st.summary()["changes"]

    # ------------------------------------------------------------------------------------------- costs
    def _fresh(self, te: Any, tid: str, r: int) -> list[dict[str, Any]]:
        g = self.spec.generation.model_copy(update={"n_prompts": FRESH_PROMPTS, "seed": FRESH_SEED + r})
        return list(self.exp.dataset(te, f"fresh {tid}", r, gen=g)["kept"])

    def _costs(self, model: ModelSpec, base: ModelSpec, te: Any, fresh: list[dict[str, Any]]) -> dict[str, Any]:
        from sublim.generation import carrier_alphabet
        from sublim.mitigate.costs import student_costs

        st = self.exp.stage("costs", {"teacher": te.describe(), "fresh": hash_obj([x["content_hash"] for x in fresh]),
                                      "base": model_identity(base), "version": 1}, {"model": self.exp._fp(model)})
        if st.claim():
            st.finish(student_costs(model, base, te.model, te.system, fresh, carrier_alphabet(self.spec.carrier),
                                    self.spec.category))
        return dict(st.summary())

    def results(self, jobs: list[dict[str, Any]], evals: list[dict[str, Any]]) -> dict[str, Any]:
        """Costs of every treatment student (unmitigated and mitigated) and of the base against each teacher,
        then the analysis: effect retained and costs per defence and target."""
        from sublim.mitigate.measure import analyse

        s = self.spec
        self.exp.log("[mitigate] measuring costs (distillation, chat loss, persona following)")
        by_tid = {tid: (target, r, te) for tid, target, r, te in self.teachers}
        fresh = {tid: self._fresh(te, tid, r) for tid, (target, r, te) in by_tid.items() if target is not None}
        costs: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
        for j in jobs:
            if j["target"] is None or not (j["arm"] == "treatment" or j.get("mitigation")):
                continue
            te = j.get("cost_teacher", j["teacher"])  # the teacher the student was meant to copy
            costs[j["arm"], j["teacher_id"], j["seed"]] = self._costs(j["model"], j["base"], te, fresh[j["teacher_id"]])
        base_costs = {tid: self._costs(s.base, s.base, by_tid[tid][2], f) for tid, f in fresh.items()}
        for e in evals:
            c = costs.get((e["arm"], e.get("teacher"), e.get("seed")))
            if c is not None:
                e["costs"] = c
        return {"arms": self.info, "base_costs": base_costs,
                "analysis": analyse(evals, self.info, list(s.targets), base_costs, conf=s.stats.conf)}
