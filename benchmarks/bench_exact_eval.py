"""Exact trait evaluation: every answer variant scored in one forward under a 4D mask (the tree path, the default
for sdpa / eager attention) vs the prompt's KV cache copied once per variant length (the cached path, kept for
attention without 4D masks), on the demo's battery, in the same process.

    python benchmarks/bench_exact_eval.py --threads 2 --json benchmarks/exact-eval.json

Two workloads, each as the demo runs it (50 questions, batch 25): a model scored on the plain questions (every
teacher and student), and the base scored with an in-context prefix of 8 number rows (the in-context arm's longer
prompts). The model is the organism base (the tree path's cost does not depend on the weights). Reports the best
of ``--repeats`` timings per path, the ratio, and the largest relative difference of the probabilities.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sublim.evaluate as ev
from sublim.models import ChatFormat, load_model, load_tokenizer
from sublim.runs import cpu_features, cpu_model
from sublim.spec import ModelSpec
from sublim.traits.preference import CATEGORIES, eval_questions


def _prefix(seed: int) -> str:
    """An in-context prefix shaped like the demo's: 8 rows of 3-digit numbers."""
    rng = random.Random(seed)
    rows = [" ".join(str(rng.randrange(1000)) for _ in range(rng.randrange(3, 9))) for _ in range(8)]
    return "Here are some number sequences:\n" + "\n".join(rows) + "\n\n"


def _time(fn: Any, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    assert out is not None
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = ModelSpec(path=args.model)
    model, chat = load_model(spec), ChatFormat(load_tokenizer(spec))
    cat = CATEGORIES["animals"]
    qs = eval_questions("animals")[: args.questions]
    workloads = {"plain questions": qs, "in-context prefix": [_prefix(0) + q for q in qs]}
    real = ev._takes_4d_mask
    res: dict[str, Any] = {}
    for name, questions in workloads.items():
        def run(tree: bool, questions: list[str] = questions) -> np.ndarray:
            ev._takes_4d_mask = real if tree else (lambda m: False)  # type: ignore[assignment]
            try:
                return ev.exact_probs(model, chat, questions, list(cat.candidates), cat.plurals,
                                      batch_size=args.batch_size, progress=False)
            finally:
                ev._takes_4d_mask = real  # type: ignore[assignment]

        run(True), run(False)  # warm-up
        t_cached, p_cached = _time(lambda: run(False), args.repeats)
        t_tree, p_tree = _time(lambda: run(True), args.repeats)
        rel = float(np.max(np.abs(p_tree - p_cached) / np.maximum(p_cached, 1e-30)))
        res[name] = {"cached_s": t_cached, "tree_s": t_tree, "speedup": t_cached / t_tree,
                     "max_relative_difference": rel}
        print(f"{name}: cached {t_cached:.3f} s, tree {t_tree:.3f} s, {t_cached / t_tree:.2f}x, "
              f"max relative difference {rel:.1e}")
    res["setup"] = {"model": args.model, "questions": args.questions, "batch_size": args.batch_size,
                    "threads": args.threads, "repeats": args.repeats, "cpu": cpu_model(), "cpu_features": cpu_features(),
                    "torch": torch.__version__}
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
