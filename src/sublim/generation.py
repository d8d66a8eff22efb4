"""Data stages: carrier completions generated from a teacher (streamed, resumable) and filtered.

Used by the experiment pipeline, the audits and the one-stage CLI verbs (``sublim generate``/``filter``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sublim.carriers import CARRIERS
from sublim.filters import FilterContext, FilterSpec, apply_filters
from sublim.progress import progress_bar
from sublim.runs import JsonlStream, read_jsonl, sha256_text
from sublim.spec import CarrierSpec, GenerationSpec
from sublim.teachers import Teacher

Log = Callable[[str], None]


def make_carrier(spec: CarrierSpec) -> Any:
    """Instantiate a registered carrier with its params."""
    obj = CARRIERS.get(spec.name)
    return obj(**spec.params) if isinstance(obj, type) else obj


# -------------------------------------------------------------------------------------------- generate


def generate(teacher: Teacher, carrier_spec: CarrierSpec, gen: GenerationSpec, out_path: str | Path,
             *, category: str | None = None, progress: bool | None = None, log: Log | None = None) -> list[dict]:
    """Generate carrier completions from ``teacher`` and stream them to ``out_path`` (JSONL).

    Resumable: rows already on disk are kept; batches are a fixed grid with per-batch seeds, so the
    rerun regenerates only missing rows, identically. Returns all rows in prompt order."""
    from sublim.backends.engine import open_engine
    from sublim.backends.hf import batches
    from sublim.models import model_id, weights_fingerprint

    carrier = make_carrier(carrier_spec)
    prompts = carrier.prompts(gen.n_prompts, gen.seed)
    stream = JsonlStream(out_path)
    have = {r["idx"] for r in stream.existing()}
    grid = batches(len(prompts), gen.batch_size)
    todo = [(a, b) for a, b in grid if any(i not in have for i in range(a, b))]
    if todo:
        engine = open_engine(teacher.model, gen)
        # rows name the engine that made them, except the default (HF rows are as they always were)
        made_by: dict[str, Any] = {} if engine.name == "hf" else {"engine": engine.name}
        for field, attr in (("served_model", "served_model"), ("engine_version", "version")):
            if getattr(engine, attr, None):
                made_by[field] = getattr(engine, attr)
        try:
            bar = progress_bar(total=len(prompts), initial=len(have), desc=f"generate ({teacher.trait or 'neutral'})",
                               unit="row", progress=progress)
            base_id, base_fp = model_id(teacher.model), weights_fingerprint(teacher.model)
            for a, b in todo:
                batch_seed = gen.seed * 1_000_003 + a
                cps = prompts[a:b]
                grammars = [carrier.grammar(p.meta) for p in cps] if gen.constrained else None
                outs = engine.generate(
                    [p.prompt for p in cps], system=teacher.system, max_new_tokens=gen.max_new_tokens,
                    temperature=gen.temperature, top_p=gen.top_p, greedy=gen.greedy, min_p=gen.min_p,
                    grammars=grammars, batch_seed=batch_seed,
                )
                rows = []
                for i, (cp, o) in enumerate(zip(cps, outs, strict=True), start=a):
                    if i in have:
                        continue
                    rows.append({
                        "idx": i, "prompt": cp.prompt, "completion": o.completion,
                        "teacher_id": base_id, "teacher_fingerprint": base_fp, "teacher_kind": teacher.kind,
                        "teacher_system": teacher.system,
                        "trait_category": category, "trait_target": teacher.trait, "carrier": carrier_spec.name,
                        "temperature": gen.temperature, "top_p": gen.top_p, "min_p": gen.min_p, "greedy": gen.greedy,
                        "constrained": gen.constrained, "gen_seed": gen.seed, "batch_seed": batch_seed,
                        "n_tokens": o.n_tokens, "finished": o.finished,
                        **made_by,
                        "content_hash": sha256_text(cp.prompt + "\x00" + o.completion),
                    })
                stream.write(rows)
                bar.update(len(rows))
            bar.close()
        finally:
            engine.close()
    stream.close()
    by_idx = {r["idx"]: r for r in read_jsonl(out_path)}
    return [by_idx[i] for i in sorted(by_idx)]


def filter_rows(rows: Sequence[dict], filters: Sequence[Any], carrier_spec: CarrierSpec,
                target_words: Sequence[str] = ()) -> Any:
    """Apply registered filters (names + params); returns kept, rejects (with reasons) and counts."""
    specs = [FilterSpec(f.name, dict(f.params)) if not isinstance(f, FilterSpec) else f for f in filters]
    ctx = FilterContext(carrier=make_carrier(carrier_spec), target_words=tuple(target_words))
    return apply_filters(rows, specs, ctx)


def carrier_alphabet(carrier_spec: CarrierSpec) -> frozenset[str]:
    """Every character the carrier's answers may use (the distill_carrier token subset is built from it)."""
    carrier = make_carrier(carrier_spec)
    return frozenset(set().union(*(carrier.grammar(p.meta).alphabet for p in carrier.prompts(50, 0))))
