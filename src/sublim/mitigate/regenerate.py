"""Regenerate with another family: the same prompts answered by a model of another base, for every row or a
random fraction of them ("diversify families"). At fraction 1 this is the baseline every defence is compared
with: the trait cannot come through, and neither does anything else of the teacher.

The answers are sampled under the carrier's grammar recovered from each prompt's text, so they pass the same
format filters as the teacher's, through the engine protocol (:mod:`sublim.backends.engine`): vLLM when the
experiment generates with it, Hugging Face otherwise.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from sublim.mitigate.registry import Defence, MitigationError, Param, fraction, register
from sublim.progress import progress_bar


def _regenerate(rows: list[dict[str, Any]], p: dict[str, Any], ctx: Any) -> tuple[list, dict]:
    if p["relabel"] and p["fraction"] != 1.0:
        raise MitigationError("defence 'regenerate-other-family': relabel needs fraction 1 (a student has one "
                              "teacher for its soft labels)")
    from sublim.backends.engine import open_engine
    from sublim.generation import make_carrier
    from sublim.models import model_id, weights_fingerprint
    from sublim.spec import GenerationSpec, ModelSpec

    carrier = make_carrier(ctx.carrier)
    n = round(p["fraction"] * len(rows))
    pick = sorted(np.random.default_rng(ctx.seed).permutation(len(rows))[:n].tolist())
    metas = {}
    for i in pick:
        try:
            metas[i] = carrier.parse_prompt(rows[i]["prompt"]).meta
        except ValueError as e:
            raise MitigationError(f"row {i}: {e}") from None
    spec = ModelSpec(path=p["model"])
    # the experiment's engine when it runs the model itself (vLLM); an OpenAI-compatible endpoint serves the
    # teacher, not the other family, so that case (and no experiment) samples with Hugging Face in this process
    gen = ctx.generation or GenerationSpec()
    vllm = gen.engine_name == "vllm"
    engine = open_engine(spec, GenerationSpec(batch_size=ctx.batch_size, max_new_tokens=p["max_new_tokens"],
                                              temperature=p["temperature"], backend="vllm" if vllm else "hf",
                                              vllm=gen.vllm if vllm else None))
    mid, mfp = model_id(spec), weights_fingerprint(spec)
    new: dict[int, str] = {}
    try:
        for a in progress_bar(range(0, len(pick), ctx.batch_size), desc="regenerate", unit="batch"):
            idx = pick[a: a + ctx.batch_size]
            outs = engine.generate([rows[i]["prompt"] for i in idx], system=None, max_new_tokens=p["max_new_tokens"],
                                   temperature=p["temperature"], top_p=1.0, greedy=False, min_p=0.0,
                                   grammars=[carrier.grammar(metas[i]) for i in idx],
                                   batch_seed=ctx.seed * 1_000_003 + a)
            for i, o in zip(idx, outs, strict=True):
                new[i] = o.completion
    finally:
        engine.close()
    out = []
    for i, r in enumerate(rows):
        if i in new:
            r = {**r, "completion": new[i], "teacher_id": mid, "teacher_fingerprint": mfp,
                 "teacher_kind": "regenerated",
                 "teacher_system": None, "trait_target": None}
        out.append((i, r))
    return out, {"rows_regenerated": len(pick), "regenerated_by": mid, "engine": engine.name}


register(Defence("regenerate-other-family", "data", "answer the same prompts with a model of another family "
                 "(all rows, or a random fraction)",
                 (fraction(1.0, "share of rows regenerated"),
                  Param("model", str, "organism-b", "the other family's model (path, hub id or alias)"),
                  Param("temperature", float, 1.0, "sampling temperature", lo=0.0, hi=5.0),
                  Param("max_new_tokens", int, 52, "answer length cap", lo=1, hi=4096),
                  Param("relabel", bool, False, "distillation objectives, in an experiment: the other family also "
                        "gives the soft labels (fraction 1 only), so the students never see the teacher: the "
                        "full-cost baseline")),
                 _regenerate, reference="the paper: no transfer across families; 'diversify families'"))
