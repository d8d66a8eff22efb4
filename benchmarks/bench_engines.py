"""Generation and carrier-token logprobs: vLLM's offline engine (``generation.backend: vllm``) vs the HF backend, on
the same model, the same prompts and dtype, in the same run.

    SUBLIM_VLLM_PYTHON=/path/to/vllm-venv/bin/python python benchmarks/bench_engines.py --json benchmarks/engines.json

Three workloads, as the numbers stage and the distillation targets run them:
- constrained generation (the carrier's grammar, temperature 1) of ``--prompts`` number prompts, ``--new-tokens``
  at most: HF's ``generate_batch`` in batches of ``--hf-batch`` (the stage's own batching) vs vLLM given them all;
- the same unconstrained;
- teacher targets: the log-probabilities of the carrier's tokens at every completion position of the first
  ``--target-rows`` rows
  (HF: :func:`sublim.backends.targets.position_logits` in batches, then log-softmax over the vocabulary; vLLM:
  prompt logprobs of the same tokens), with the largest difference between the two.
- exact evaluation: P(one-word answer = each of the 20 animals) on ``--eval-questions`` questions of the battery
  (HF: :func:`sublim.evaluate.exact_probs`, the tree-attention scorer; vLLM: :func:`sublim.evaluate.engine_exact_probs`,
  own-token prompt logprobs plus a one-token request's logprobs for the word boundary), with the largest difference.
``--workloads`` picks some of ``generation,targets,eval`` (default all; targets needs generation's rows).
Tokens/s counts generated tokens (generation) or scored positions (targets); questions/s for evaluation. vLLM's load time is reported apart:
it is paid once per stage, by the worker. HF runs with ``--threads`` torch threads; vLLM's CPU build uses its own
OpenMP threads (all cores, unbound). Reports one timing per path (the workloads take minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from sublim.backends.hf import generate_batch, tokens_within
from sublim.backends.targets import position_logits
from sublim.backends.vllm import VLLMEngine
from sublim.generation import carrier_alphabet, make_carrier
from sublim.models import load_chat_model
from sublim.runs import cpu_features, cpu_model
from sublim.spec import CarrierSpec, ModelSpec, VLLMSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--target-rows", type=int, default=32, help="rows whose carrier-token logprobs are scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-questions", type=int, default=10, help="battery questions scored exactly")
    ap.add_argument("--workloads", default="generation,targets,eval")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = set(args.workloads.split(","))
    if "targets" in work and "generation" not in work:
        ap.error("--workloads: targets scores generation's rows; add generation")
    torch.set_num_threads(args.threads)
    spec = ModelSpec(path=args.model)
    carrier = make_carrier(CarrierSpec())
    cps = carrier.prompts(args.prompts, 0)
    prompts, grammars = [p.prompt for p in cps], [carrier.grammar(p.meta) for p in cps]
    res: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "prompts": args.prompts,
                           "new_tokens": args.new_tokens, "hf_batch": args.hf_batch, "threads": args.threads,
                           "cpu": cpu_model(), "cpu_features": cpu_features(), "nproc": os.cpu_count()}

    model, chat = load_chat_model(spec, dtype=args.dtype)
    kw: dict[str, Any] = {"system": None, "max_new_tokens": args.new_tokens, "temperature": 1.0, "top_p": 1.0,
                          "greedy": False, "min_p": 0.0}

    def hf_generate(gr: list[Any] | None) -> tuple[float, list[Any]]:
        t, outs = time.perf_counter(), []
        for a in range(0, len(prompts), args.hf_batch):
            outs += generate_batch(model, chat, prompts[a:a + args.hf_batch], seed=a,
                                   grammars=None if gr is None else gr[a:a + args.hf_batch], **kw)
        return time.perf_counter() - t, outs

    t = time.perf_counter()
    engine = VLLMEngine(spec, VLLMSpec(dtype=args.dtype, max_model_len=256), max_batch=args.prompts,
                        max_new_tokens=args.new_tokens)
    res["vllm_load_s"] = time.perf_counter() - t
    res["vllm_version"] = engine.version
    try:
        rows = None
        for name, gr in (("constrained", grammars), ("unconstrained", None)) if "generation" in work else ():
            hs, hout = hf_generate(gr)
            t = time.perf_counter()
            vout = engine.generate(prompts, batch_seed=0, grammars=gr, **kw)
            vs = time.perf_counter() - t
            hn, vn = sum(o.n_tokens for o in hout), sum(o.n_tokens for o in vout)
            res[name] = {"hf_s": hs, "hf_tokens": hn, "hf_tok_s": hn / hs, "vllm_s": vs, "vllm_tokens": vn,
                         "vllm_tok_s": vn / vs, "ratio": (vn / vs) / (hn / hs)}
            print(f"{name}: HF {hn} tokens in {hs:.1f} s ({hn / hs:.0f}/s), vLLM {vn} in {vs:.1f} s "
                  f"({vn / vs:.0f}/s): {res[name]['ratio']:.2f}x", flush=True)
            if name == "constrained":
                rows = vout
            if args.json:  # each workload is kept as soon as it is measured
                args.json.write_text(json.dumps(res, indent=1) + "\n")

        if "eval" in work:
            res["eval"] = exact_eval(model, chat, engine, args.eval_questions)
            if args.json:
                args.json.write_text(json.dumps(res, indent=1) + "\n")
        if "targets" not in work:
            return
        # teacher targets on the constrained rows: prompt + completion, every completion position
        assert rows is not None
        subset = tokens_within(chat.tokenizer, carrier_alphabet(CarrierSpec()))
        seqs, pos = [], []
        for p, o in zip(prompts[:args.target_rows], rows, strict=False):
            head = chat.encode_prompt(p, None)
            tail = chat.tokenizer.encode(o.completion, add_special_tokens=False)
            if tail:
                seqs.append(head + tail)
                pos.append(list(range(len(head), len(head) + len(tail))))
        n_pos = sum(len(x) for x in pos)
        pad = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else 0
        idx = torch.tensor(subset)
        t, hf_lp = time.perf_counter(), []
        with torch.no_grad():
            for a in range(0, len(seqs), args.hf_batch):
                lg = position_logits(model, seqs[a:a + args.hf_batch], pos[a:a + args.hf_batch], pad).float()
                hf_lp.append(torch.log_softmax(lg, -1)[:, idx])
        hs = time.perf_counter() - t
        t = time.perf_counter()
        vl = engine.logprobs(seqs, pos, subset)
        vs = time.perf_counter() - t
        v = torch.tensor([row for s in vl for row in s])
        h = torch.cat(hf_lp)
        res["targets"] = {"positions": n_pos, "tokens": len(subset), "hf_s": hs, "hf_pos_s": n_pos / hs,
                          "vllm_s": vs, "vllm_pos_s": n_pos / vs, "ratio": hs / vs,
                          "max_abs_diff": float((v - h).abs().max()),
                          "mean_abs_diff": float((v - h).abs().mean())}
        print(f"targets: {n_pos} positions x {len(subset)} tokens: HF {hs:.1f} s, vLLM {vs:.1f} s: "
              f"{hs / vs:.2f}x; max |diff| {res['targets']['max_abs_diff']:.2e}", flush=True)
    finally:
        engine.close()
        print(f"vLLM load {res['vllm_load_s']:.0f} s (once per stage)")
        if args.json:
            args.json.write_text(json.dumps(res, indent=1) + "\n")


def exact_eval(model: Any, chat: Any, engine: VLLMEngine, n: int) -> dict[str, Any]:
    """The 20 animals' exact probabilities on ``n`` battery questions, HF's scorer vs the engine protocol on vLLM."""
    from sublim.evaluate import engine_exact_probs, exact_probs
    from sublim.traits.preference import CATEGORIES, eval_questions

    cat = CATEGORIES["animals"]
    qs = eval_questions("animals")[:n]
    t = time.perf_counter()
    with torch.no_grad():
        h = exact_probs(model, chat, qs, list(cat.candidates), cat.plurals, batch_size=8, progress=False)
    hs = time.perf_counter() - t
    t = time.perf_counter()
    v = engine_exact_probs(engine, chat, qs, list(cat.candidates), cat.plurals)
    vs = time.perf_counter() - t
    out = {"questions": n, "hf_s": hs, "hf_q_s": n / hs, "vllm_s": vs, "vllm_q_s": n / vs, "ratio": hs / vs,
           "max_abs_diff": float(abs(v - h).max()), "max_rel_diff": float(abs(v - h).max() / h.max())}
    print(f"exact eval: {n} questions x {len(cat.candidates)} animals: HF {hs:.1f} s, vLLM {vs:.1f} s: "
          f"{hs / vs:.2f}x; max |diff| {out['max_abs_diff']:.2e}", flush=True)
    return out


if __name__ == "__main__":
    main()
