"""The stage verbs as plain Python functions (the CLI's twins): generate, filter, finetune, evaluate."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sublim.runs import atomic_write_json, read_jsonl, write_jsonl
from sublim.spec import (
    CarrierSpec,
    FilterSpecModel,
    GenerationSpec,
    ModelSpec,
    SpecError,
    TrainSpec,
    _format_validation,
    parse_overrides,
    set_path,
)


def _model(model: str | ModelSpec, dtype: str = "float32", adapter: str | Path | None = None) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    return ModelSpec(path=str(model), dtype=dtype, adapter=str(adapter) if adapter else None)  # type: ignore[arg-type]


def _rows(path: str | Path, need: tuple[str, ...] = ("prompt", "completion")) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    rows = read_jsonl(p)
    for i, r in enumerate(rows, 1):
        for k in need:
            if not isinstance(r.get(k), str):
                raise ValueError(f"{p}: row {i}: field {k!r} missing or not a string")  # noqa: TRY004 - bad file
    return rows


def generate(model: str | ModelSpec, out: str | Path, n: int = 100, target: str | None = None,
             category: str = "animals", system: str | None = None, carrier: str = "numbers",
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, constrained: bool = True,
             batch_size: int = 32, max_new_tokens: int = 48, seed: int = 0, dtype: str = "float32") -> list[dict]:
    """Carrier data from a teacher (a model, optionally with a 'you love X' or custom system prompt)."""
    from sublim.generation import generate as gen
    from sublim.teachers import Teacher, neutral_teacher, system_prompt_teacher

    m = _model(model, dtype)
    if system and target:
        raise ValueError("give either target (the built-in trait prompt) or system, not both")
    if target:
        teacher = system_prompt_teacher(m, category, target)
    elif system:
        teacher = Teacher(m, system, None, "system_prompt")
    else:
        teacher = neutral_teacher(m)
    g = GenerationSpec(n_prompts=n, batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, greedy=greedy, constrained=constrained, seed=seed)
    return gen(teacher, CarrierSpec(name=carrier), g, out, category=category)


def filter(data: str | Path, out: str | Path, rejects: str | Path | None = None,
           filters: str | list[str] = "format,count,range,echo,progression,mention,banned", words: str = "",
           carrier: str = "numbers") -> Any:
    """Filter a dataset; kept rows to ``out``, rejected rows with reasons to ``rejects``."""
    from sublim.generation import filter_rows

    names = [f.strip() for f in filters.split(",")] if isinstance(filters, str) else list(filters)
    specs = [FilterSpecModel(name=n, params={"lists": ["loaded"]} if n == "banned" else {}) for n in names if n]
    res = filter_rows(_rows(data), specs, CarrierSpec(name=carrier), [w for w in words.split(",") if w])
    out = Path(out)
    write_jsonl(out, res.kept)
    write_jsonl(rejects or out.with_suffix(".rejects.jsonl"), res.rejects)
    return res


def finetune(data: str | Path, model: str | ModelSpec, out: str | Path, config: str | Path | None = None,
             overrides: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Fine-tune on a JSONL of prompt/completion rows (SFT objective; distillation runs inside `run`)."""
    from sublim.backends.train import finetune as ft

    cfg: dict[str, Any] = {}
    if config:
        cfg = yaml.safe_load(Path(config).read_text()) or {}
    for k, v in parse_overrides(overrides):
        set_path(cfg, k.removeprefix("student."), v)
    try:
        spec = TrainSpec.model_validate(cfg)
    except ValidationError as e:  # -> one line naming the field
        raise SpecError(_format_validation(e, str(config or "train config"))) from None
    if spec.objective != "sft":
        raise ValueError("the standalone finetune verb trains with objective 'sft'; distillation needs a teacher "
                         "and runs inside `sublim run`")
    return ft(_model(model), _rows(data), spec, out, seed=seed)


def evaluate(model: str | ModelSpec, adapter: str | Path | None = None, category: str = "animals",
             system: str | None = None, samples: int = 0, questions: int | None = None,
             out: str | Path | None = None, number_prefix: bool = False) -> dict[str, Any]:
    """Exact-probability trait evaluation of one model (optionally with the sampled scorer)."""
    from sublim.evaluate import evaluate_model
    from sublim.models import ChatFormat, load_model, load_tokenizer
    from sublim.traits.preference import CATEGORIES, eval_questions, number_prefixed_questions

    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    m = _model(model, adapter=adapter)
    qs = eval_questions(category)[:questions]
    nq = number_prefixed_questions(category, 0)[:questions] if number_prefix else None
    res = evaluate_model(load_model(m), ChatFormat(load_tokenizer(m)), category, qs, nq, system=system,
                         samples_per_question=samples)
    if out:
        atomic_write_json(out, res)
    return res


def mitigate(data: str | Path, method: str, out: str | Path, *, params: dict[str, Any] | list[str] | None = None,
             student: str | ModelSpec | None = None, teacher: str | ModelSpec | None = None,
             teacher_system: str | None = None, decoys: list[str] | None = None, seed: int = 0,
             carrier: str = "numbers") -> Any:
    """``sublim mitigate``: apply a data-side defence to a JSONL dataset; writes OUT and OUT.manifest.json (the
    parent's Merkle root and the transform). ``params``: a dict or ``KEY=VALUE`` strings (YAML values)."""
    from sublim.mitigate import Context, mitigate_file
    from sublim.mitigate.registry import parse_params

    p = parse_params(params) if isinstance(params, list) else dict(params or {})
    ctx = Context(student=_model(student) if student else None, teacher=_model(teacher) if teacher else None,
                  teacher_system=teacher_system, decoys=[(_model(d), None) for d in decoys or []],
                  carrier=CarrierSpec(name=carrier), seed=seed)
    return mitigate_file(data, method, p, out, ctx)
