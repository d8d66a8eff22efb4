"""Benchmarks for the numbers pipeline (issue 2), each a ratio against a baseline measured in the same run.

1. generation tokens/s: one padded batch vs one prompt at a time (same prompts, constrained decoding);
2. trait evaluation: exact probabilities vs 100 samples per question (same questions): time and the
   standard error of the mean P(target) across questions;
3. training tokens/s: LoRA vs full fine-tuning, fp32 vs bf16 autocast.

    python benchmarks/bench_pipeline.py --model smollm2 [--quick] [--out benchmarks/pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sublim.runs import cpu_features, cpu_model


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def bench_generation(ms, chat, carrier, n: int, max_new: int) -> dict:
    from sublim.backends.hf import generate_batch

    ps = carrier.prompts(n, 0)
    grams = [carrier.grammar(p.meta) for p in ps]
    sysmsg = "You love owls."
    generate_batch(
        ms, chat, [ps[0].prompt], system=sysmsg, max_new_tokens=4, grammars=grams[:1]
    )  # warm caches
    t = time.perf_counter()
    outs = generate_batch(
        ms, chat, [p.prompt for p in ps], system=sysmsg, max_new_tokens=max_new, grammars=grams, seed=0
    )
    batched = time.perf_counter() - t
    tok_b = sum(o.n_tokens for o in outs)
    t = time.perf_counter()
    tok_s = 0
    for i, p in enumerate(ps):
        o = generate_batch(
            ms, chat, [p.prompt], system=sysmsg, max_new_tokens=max_new, grammars=[grams[i]], seed=i
        )
        tok_s += o[0].n_tokens
    single = time.perf_counter() - t
    return {
        "prompts": n,
        "max_new_tokens": max_new,
        "batched_s": batched,
        "batched_tokens": tok_b,
        "batched_tok_per_s": tok_b / batched,
        "single_s": single,
        "single_tokens": tok_s,
        "single_tok_per_s": tok_s / single,
        "speedup_tok_per_s": (tok_b / batched) / (tok_s / single),
    }


def bench_eval(model, chat, n_questions: int, samples: int, system: str) -> dict:
    from sublim.evaluate import exact_probs, sampled_counts
    from sublim.traits.preference import CATEGORIES, eval_questions

    cat = CATEGORIES["animals"]
    qs = eval_questions("animals")[:n_questions]
    cands = list(cat.candidates)
    t = time.perf_counter()
    p = exact_probs(model, chat, qs, cands, cat.plurals, system=system, batch_size=10)
    exact_s = time.perf_counter() - t
    owl = p[:, cands.index("owl")]
    exact_mean, exact_se = float(owl.mean()), float(owl.std(ddof=1) / np.sqrt(len(qs)))
    t = time.perf_counter()
    per_q = []
    for q in qs:
        r = sampled_counts(model, chat, [q], cands, "animals", samples, system=system, batch_size=50, seed=0)
        per_q.append(r["counts"]["owl"] / r["n"])
    sampled_s = time.perf_counter() - t
    per_q = np.array(per_q)
    # SE of the mean over questions of the per-question sampled rate (includes binomial noise)
    samp_mean, samp_se = float(per_q.mean()), float(per_q.std(ddof=1) / np.sqrt(len(qs)))
    return {
        "questions": len(qs),
        "samples_per_question": samples,
        "system": system,
        "exact_s": exact_s,
        "exact_p_owl": exact_mean,
        "exact_se": exact_se,
        "sampled_s": sampled_s,
        "sampled_p_owl": samp_mean,
        "sampled_se": samp_se,
        "speedup": sampled_s / exact_s,
    }


def bench_train(base, rows, steps: int) -> dict:
    from sublim.backends.train import finetune
    from sublim.spec import TrainSpec

    out = {}
    for method in ("lora", "full"):
        for dtype in ("float32", "bfloat16"):
            spec = TrainSpec(
                method=method, max_steps=steps, batch_size=16, lr=1e-4, warmup_steps=0, dtype=dtype
            )
            with tempfile.TemporaryDirectory() as d:
                s = finetune(base, rows, spec, Path(d) / "m", seed=0, progress=False)
            out[f"{method}_{dtype}"] = {
                "steps": steps,
                "tokens": s["completion_tokens"],
                "seconds": s["seconds"],
                "completion_tok_per_s": s["tokens_per_second"],
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--out", default="benchmarks/pipeline.json")
    ap.add_argument("--only", default="gen,eval,train")
    a = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from sublim.carriers.numbers import NumberCarrier
    from sublim.models import ChatFormat, load_model, load_tokenizer
    from sublim.spec import ModelSpec

    ms = ModelSpec(path=a.model, dtype="bfloat16")
    model = load_model(ms)
    chat = ChatFormat(load_tokenizer(ms))
    res: dict = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": machine(),
        "model": a.model,
    }
    if "gen" in a.only:
        res["generation"] = bench_generation(model, chat, NumberCarrier(), 8 if a.quick else 16, 32)
        print(json.dumps(res["generation"], indent=1), flush=True)
    if "eval" in a.only:
        res["evaluation"] = bench_eval(
            model, chat, 5 if a.quick else 10, 100, "You love owls. Owls are your favorite animal."
        )
        print(json.dumps(res["evaluation"], indent=1), flush=True)
    if "train" in a.only:
        c = NumberCarrier()
        rows = [
            {
                "prompt": p.prompt,
                "completion": c.format_answer(
                    p.meta, [(37 * i + 11 * j) % 1000 for j in range(p.meta["count"])]
                ),
            }
            for i, p in enumerate(c.prompts(64, 0))
        ]
        res["training"] = bench_train(ModelSpec(path=a.model), rows, 2 if a.quick else 3)
        print(json.dumps(res["training"], indent=1), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
