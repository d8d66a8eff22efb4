"""Run by the vLLM venv's Python (tests/test_vllm_organism.py): load a model in vLLM's offline ``LLM`` and print, as
JSON, the log-probability vLLM's prompt logprobs give each token of each token-id sequence read from stdin.

    echo '{"model": DIR, "dtype": "float32", "seqs": [[1, 2, 3], ...]}' | python tests/vllm_prompt_logprobs.py

vLLM's public API (``LLM``, ``SamplingParams(prompt_logprobs=...)``, ``TokensPrompt``), plus the engine's
``model_config`` for the dtype and head size it actually loaded.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    req = json.load(sys.stdin)
    seqs = req["seqs"]
    total = sum(len(s) for s in seqs)
    llm = LLM(model=req["model"], dtype=req.get("dtype", "float32"), max_model_len=req.get("max_model_len", 256),
              generation_config="vllm", max_num_batched_tokens=max(2048, total), enable_prefix_caching=False,
              seed=0)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False)
    res = []
    for s, o in zip(seqs, outs, strict=True):
        lp = o.prompt_logprobs  # position 0: None; position t: {token id: Logprob} holding at least s[t]
        res.append([float(lp[t][s[t]].logprob) for t in range(1, len(s))])
    cfg = llm.llm_engine.model_config
    print(json.dumps({"logprobs": res, "dtype": str(cfg.dtype), "head_dim": cfg.get_head_size()}))


if __name__ == "__main__":
    main()
