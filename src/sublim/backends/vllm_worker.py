"""The vLLM side of :mod:`sublim.backends.vllm`: one model per process (vLLM does not reliably free a model's
memory), requests as JSON lines on stdin, one JSON line per request on the protocol stream (the original stdout;
everything vLLM or anything else prints goes to stderr).

Runs in any Python that has vLLM, usually its own venv (the CPU build pins its own transformers), and imports
nothing from sublim, so it is started by path: ``python .../vllm_worker.py``. vLLM's public API only: ``LLM``,
``SamplingParams`` (per-request ``seed``, ``temperature``, ``top_p``, ``min_p``, ``stop_token_ids``,
``prompt_logprobs``), ``StructuredOutputsParams(regex=...)`` and ``TokensPrompt``.

Requests (``op``):
- ``load``: ``model`` (a local model directory), ``dtype``, ``max_model_len``, ``max_num_batched_tokens``,
  ``seed``; answers the dtype and head size the engine loaded and vLLM's version.
- ``generate``: ``prompts`` (token-id lists) and ``params`` (one dict per prompt: ``seed``, ``temperature``,
  ``top_p``, ``min_p``, ``max_tokens``, ``stop_token_ids``, ``regex`` or null); answers each output's
  ``token_ids`` and ``finish_reason``.
- ``logprobs``: ``seqs`` (token-id lists) and ``positions`` (per sequence, the positions 1 <= t <= len(seq) to read;
  t = len(seq), the token after the sequence, from a one-token request's ``logprobs``) and
  ``tokens`` (token ids, or null for each sequence's own next token): answers, per sequence and position, the
  log-probability of each requested token as the next token after ``seq[:t]`` (from prompt logprobs); with
  ``reduce: "logsumexp"`` one value per position instead, the log of the requested tokens' total probability.
- ``close``.
A failed request answers ``{"error": "<type>: <message>"}`` and the worker goes on.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

# started by path, this file's directory (sublim/backends, which holds sublim's own vllm.py) would come first on
# sys.path and shadow the real vLLM
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

_LOGPROB_ENTRIES = 2_000_000
_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


class _Worker:
    def __init__(self) -> None:
        self.llm: Any = None

    def load(self, req: dict[str, Any]) -> dict[str, Any]:
        import vllm
        from vllm import LLM

        kw: dict[str, Any] = {}
        if req.get("gpu_memory_utilization"):
            kw["gpu_memory_utilization"] = float(req["gpu_memory_utilization"])
        self.llm = LLM(model=req["model"], dtype=req.get("dtype", "bfloat16"),
                       max_model_len=int(req.get("max_model_len", 512)),
                       max_num_batched_tokens=int(req.get("max_num_batched_tokens", 16384)),
                       seed=int(req.get("seed", 0)), generation_config="vllm", max_logprobs=-1,
                       enable_prefix_caching=False, **kw)
        cfg = self.llm.llm_engine.model_config
        return {"dtype": str(cfg.dtype).replace("torch.", ""), "head_dim": cfg.get_head_size(),
                "vocab_size": cfg.get_vocab_size(), "vllm": vllm.__version__}

    def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        try:
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError:  # vLLM before structured outputs
            StructuredOutputsParams = None

        params = []
        for p in req["params"]:
            kw: dict[str, Any] = {"seed": p.get("seed"), "temperature": float(p.get("temperature", 1.0)),
                                  "top_p": float(p.get("top_p", 1.0)), "min_p": float(p.get("min_p", 0.0)),
                                  "max_tokens": int(p["max_tokens"]), "stop_token_ids": list(p.get("stop_token_ids") or []),
                                  "skip_special_tokens": False, "detokenize": False}
            if p.get("regex") is not None:
                if StructuredOutputsParams is None:
                    raise RuntimeError(f"vLLM {_version()} has no structured outputs (StructuredOutputsParams)")
                kw["structured_outputs"] = StructuredOutputsParams(regex=p["regex"])
            params.append(SamplingParams(**kw))
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in req["prompts"]], params, use_tqdm=False)
        return {"outputs": [{"token_ids": list(o.outputs[0].token_ids), "finish_reason": o.outputs[0].finish_reason}
                            for o in outs]}

    def logprobs(self, req: dict[str, Any]) -> dict[str, Any]:
        tokens = req.get("tokens")
        seqs, positions = req["seqs"], req["positions"]
        inner = [[t for t in pos if t < len(s)] for s, pos in zip(seqs, positions, strict=True)]
        last = [i for i, (s, pos) in enumerate(zip(seqs, positions, strict=True)) if len(s) in pos]
        res = self._prompt_logprobs(seqs, inner, tokens, req.get("reduce")) if any(inner) else [[] for _ in seqs]
        if last and not tokens:
            raise ValueError("position len(seq) (the next token) needs tokens")
        if last and tokens:  # the token after the whole sequence: a one-token request's logprobs, one position each
            nxt = self._next_logprobs([seqs[i] for i in last], tokens, req.get("reduce"))
            for i, v in zip(last, nxt, strict=True):
                got = dict(zip(inner[i], res[i], strict=True))
                got[len(seqs[i])] = v
                res[i] = [got[t] for t in positions[i]]
        return {"logprobs": res}

    def _next_logprobs(self, seqs: list[list[int]], tokens: list[int], reduce: str | None) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False)
        vocab = self.llm.llm_engine.model_config.get_vocab_size()
        out: list[list[float]] = []
        step = max(1, _LOGPROB_ENTRIES // vocab)
        for a in range(0, len(seqs), step):
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs[a:a + step]], params,
                                     use_tqdm=False)
            for o in outs:
                lp = o.outputs[0].logprobs[0]  # {token id: Logprob} over the vocabulary, for the first new token
                v = [float(lp[k].logprob) for k in tokens]
                out.append([_logsumexp(v)] if reduce == "logsumexp" else v)
            del outs
        return out

    def _prompt_logprobs(self, seqs: list[list[int]], positions: list[list[int]], tokens: list[int] | None,
                         reduce: str | None) -> list[list[list[float]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=-1 if tokens else 0, detokenize=False)
        # a subset of tokens needs the whole vocabulary's prompt logprobs (vLLM has no per-token selection): one
        # Python object per token and position, so sequences go in chunks of at most _LOGPROB_ENTRIES of them
        # (at least one sequence), each reduced to the subset before the next (a 49k vocabulary at 256 rows of
        # 100 tokens at once took the worker past 24 GB)
        vocab = self.llm.llm_engine.model_config.get_vocab_size() if tokens else 1
        res: list[list[list[float]]] = []
        i = 0
        while i < len(seqs):
            j, size = i, 0
            while j < len(seqs) and (j == i or size + len(seqs[j]) * vocab <= _LOGPROB_ENTRIES):
                size += len(seqs[j]) * vocab
                j += 1
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs[i:j]], params, use_tqdm=False)
            for s, pos, o in zip(seqs[i:j], positions[i:j], outs, strict=True):
                lp = o.prompt_logprobs  # index t: {token id: Logprob} for the token at t given s[:t]; 0 is None
                rows = [[float(lp[t][k].logprob) for k in (tokens if tokens else [s[t]])] for t in pos]
                res.append([[_logsumexp(v)] for v in rows] if reduce == "logsumexp" else rows)
            del outs
            i = j
        return res


def _logsumexp(v: list[float]) -> float:
    import math

    m = max(v)
    return m if m == float("-inf") else m + math.log(sum(math.exp(x - m) for x in v))


def _version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except ImportError:
        return "?"


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's logs and any print go to stderr; the protocol stream stays clean
    sys.stdout = sys.stderr
    for k, v in _ENV.items():
        os.environ.setdefault(k, v)
    w = _Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "close":
                proto.write(json.dumps({"ok": True}) + "\n")
                break
            if op not in ("load", "generate", "logprobs"):
                raise ValueError(f"unknown op {op!r}")
            if op != "load" and w.llm is None:
                raise RuntimeError("no model loaded (send op 'load' first)")
            out = getattr(w, op)(req)
        except Exception as e:  # noqa: BLE001 - every failure is answered, and the worker goes on
            out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        proto.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
