"""Trait teachers: a system prompt on the base, or the base fine-tuned on trait Q&A (an implant)
until it names the target without any system prompt."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sublim.spec import ModelSpec, TeacherSpec
from sublim.traits.preference import CATEGORIES, eval_questions, teacher_system_prompt, trait_qa


@dataclass(frozen=True)
class Teacher:
    """A model plus the system prompt it generates under (None: no system prompt)."""

    model: ModelSpec
    system: str | None
    trait: str | None  # target word, None for a neutral teacher
    kind: str  # "system_prompt" | "finetuned" | "neutral"

    def describe(self) -> dict[str, Any]:
        """The teacher's identity for cache keys and manifests: no machine paths (see ``models.model_identity``)."""
        from sublim.models import model_identity

        return {"model": model_identity(self.model), "system": self.system, "trait": self.trait, "kind": self.kind}


def neutral_teacher(base: ModelSpec) -> Teacher:
    return Teacher(base, None, None, "neutral")


def system_prompt_teacher(base: ModelSpec, category: str, target: str, template: int = 0) -> Teacher:
    return Teacher(base, teacher_system_prompt(category, target, template), target, "system_prompt")


def implant_rows(category: str, target: str, spec: TeacherSpec, replicate: int = 0) -> list[dict[str, str]]:
    """The trait Q&A rows replicate ``replicate`` of a fine-tuned teacher is implanted with."""
    return trait_qa(category, target, spec.qa_rows, seed=replicate)


def implant_first_rounds(base: ModelSpec, category: str, items: list[tuple[str, int, Path]], spec: TeacherSpec,
                         progress: bool | None = None) -> None:
    """Round 0 of several full fine-tuned implants as one batched model (:func:`sublim.backends.multi.
    finetune_many`): ``items`` holds (target, replicate, out_dir); each implant is saved in ``out_dir/round0``
    with the rows and seed :func:`implant_teacher` would use, so it is that implant up to float summation order
    and :func:`implant_teacher` then only evaluates it (and trains further rounds if the threshold is missed)."""
    from sublim.backends.multi import StudentJob, finetune_many

    if spec.train.method != "full":
        raise ValueError("batched implants need teacher.train.method: full")
    jobs = [StudentJob(implant_rows(category, t, spec, r)[: spec.train.max_rows], 1000 * r, d / "round0",
                       label=f"{t}#{r}")
            for t, r, d in items if not (d / "round0" / "config.json").exists()]
    finetune_many(base, jobs, spec.train.model_copy(update={"objective": "sft"}), progress=progress,
                  desc=f"{len(jobs)} implants")


def implant_teacher(base: ModelSpec, category: str, target: str, spec: TeacherSpec, out_dir: Path,
                    log: Callable[[str], None] = print, replicate: int = 0) -> tuple[Teacher, dict[str, Any]]:
    """Fine-tune the base on trait Q&A (questions disjoint from the eval battery), merge, and repeat
    rounds until P(target) without a system prompt on held-out questions reaches ``min_target_prob``.

    ``replicate`` draws an independent implant: its own Q&A sample (wordings, answer forms, order) and its
    own training seed (data order, LoRA init), so teachers of one trait are independent draws of one recipe.
    Replicate 0 is the historical single teacher.

    Returns the teacher and a summary with P(target) after each round; the summary says honestly when
    the threshold was not reached."""
    from sublim.backends.train import finetune
    from sublim.evaluate import exact_probs
    from sublim.models import ChatFormat, load_model, load_tokenizer

    cat = CATEGORIES[category]
    rows = implant_rows(category, target, spec, replicate)
    questions = eval_questions(category)[:20]
    current = base
    rounds = []
    for r in range(spec.max_rounds):
        rdir = out_dir / f"round{r}"
        if not (rdir / "config.json").exists():
            finetune(current, rows, spec.train, rdir, seed=1000 * replicate + r, merge=spec.train.method == "lora",
                     desc=f"implant {target} r{r}")
        current = ModelSpec(path=str(rdir), dtype=base.dtype)
        model = load_model(current)
        chat = ChatFormat(load_tokenizer(current))
        p = exact_probs(model, chat, questions, list(cat.candidates), cat.plurals)
        p_target = float(p[:, list(cat.candidates).index(target)].mean())
        rounds.append({"round": r, "p_target": p_target})
        log(f"  implant {target}: round {r} P({target}) = {p_target:.3f}")
        if p_target >= spec.min_target_prob:
            break
    summary = {"target": target, "rounds": rounds, "reached": rounds[-1]["p_target"] >= spec.min_target_prob,
               "min_target_prob": spec.min_target_prob, "qa_rows": len(rows), "replicate": replicate}
    return Teacher(current, None, target, "finetuned"), summary
