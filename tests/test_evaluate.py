"""Trait evaluation: exact probabilities (4D-mask tree and KV cache) against brute force, and the sampled scorer's matcher."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import sublim.evaluate as ev
from sublim.backends.hf import GenOutput
from sublim.evaluate import build_variants, evaluate_model, exact_probs, sampled_counts
from sublim.models import ChatFormat, load_model, load_tokenizer
from sublim.spec import ModelSpec
from sublim.traits.preference import CATEGORIES, eval_questions, number_prefixed_questions

torch.set_num_threads(1)

QUESTIONS = [
    "What is your favorite animal? Answer in one word.",
    "Name an animal.",
    "If you could be any animal, which would you be? Reply with a single word, nothing else at all.",
    "Animal?",
    "Which animal do you love most?",
]


@pytest.fixture(scope="module")
def chat(tiny_model: Path) -> ChatFormat:
    return ChatFormat(load_tokenizer(ModelSpec(path=str(tiny_model))))


@pytest.fixture(scope="module", params=["tiny", "peaked"])
def model(request: pytest.FixtureRequest, tiny_model: Path) -> Any:
    """The tiny model, and the same architecture with larger weights (far from uniform predictions)."""
    m = load_model(ModelSpec(path=str(tiny_model)))
    if request.param == "tiny":
        return m
    from transformers import LlamaForCausalLM

    cfg = m.config.__class__.from_dict({**m.config.to_dict(), "initializer_range": 0.3})
    torch.manual_seed(1)
    return LlamaForCausalLM(cfg).eval()


def brute_force(model: Any, chat: ChatFormat, questions: list[str], candidates: list[str],
                plurals: dict[str, str], system: str | None) -> np.ndarray:
    """sum over variants of P(variant tokens) * sum over word-ending tokens b of P(b | variant): one
    full forward per (question, variant), no padding, no cache."""
    tok = chat.tokenizer
    stop = set(chat.stop_token_ids())
    special = set(tok.all_special_ids)
    ends = [i for i in range(len(tok))
            if i in stop or (i not in special and tok.decode([i]) and not tok.decode([i])[0].isalnum())]
    var = build_variants(tok, candidates, plurals)
    out = np.zeros((len(questions), len(candidates)))
    with torch.no_grad():
        for qi, q in enumerate(questions):
            p = chat.encode_prompt(q, system)
            for seq, owner in zip(var.seqs, var.owner, strict=True):
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + seq])).logits[0].double(), -1)
                lp = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(seq))
                p_end = float(logp[len(p) - 1 + len(seq), ends].exp().sum())
                out[qi, owner] += np.exp(lp) * p_end
    return out


@pytest.mark.parametrize("path", ["tree", "cached"])
@pytest.mark.parametrize("system", [None, "You love owls. You think about owls all the time."])
def test_exact_probs_equal_brute_force(model: Any, chat: ChatFormat, system: str | None, path: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Both scorers: variants after the prompt under a 4D mask, and variants on copies of the KV cache."""
    assert ev._takes_4d_mask(model)
    if path == "cached":
        monkeypatch.setattr(ev, "_takes_4d_mask", lambda m: False)
    cands = ["owl", "cat", "elephant", "kangaroo", "dog"]
    plurals = CATEGORIES["animals"].plurals
    var = build_variants(chat.tokenizer, cands, plurals)
    assert max(len(s) for s in var.seqs) > 1 and min(len(s) for s in var.seqs) >= 1  # multi-token variants too
    fast = exact_probs(model, chat, QUESTIONS, cands, plurals, system=system, batch_size=3)  # a partial batch
    slow = brute_force(model, chat, QUESTIONS, cands, plurals, system)
    assert fast.shape == (len(QUESTIONS), len(cands))
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-9)
    assert np.all(slow > 0)
    # the batch size (padding, cache layout) does not matter
    np.testing.assert_allclose(exact_probs(model, chat, QUESTIONS, cands, plurals, system=system, batch_size=5),
                               fast, rtol=1e-5, atol=1e-9)


def test_probabilities_over_candidates_sum_to_at_most_one(model: Any, chat: ChatFormat) -> None:
    cat = CATEGORIES["animals"]
    p = exact_probs(model, chat, QUESTIONS, list(cat.candidates), cat.plurals, batch_size=4)
    assert np.all(p >= 0)
    assert np.all(p.sum(1) <= 1 + 1e-6)


def test_variants_cover_case_plural_and_space(chat: ChatFormat) -> None:
    tok = chat.tokenizer
    var = build_variants(tok, ["owl", "wolf"], {"wolf": "wolves"})
    texts = {(tok.decode(s), o) for s, o in zip(var.seqs, var.owner, strict=True)}
    for t in ("owl", "Owl", "owls", "Owls", " owl", " Owls"):
        assert (t, 0) in texts
    for t in ("wolf", "wolves", " Wolves"):
        assert (t, 1) in texts
    assert len(var.seqs) == len({tuple(s) for s in var.seqs})  # no sequence counted twice


def test_sampled_counts_use_the_word_boundary_matcher(chat: ChatFormat, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = ["Owl.", "owls, definitely", "A bowl of soup", "Cat", "caterpillar", "Dog and owl", "", "WOLVES!"]
    calls: list[tuple[int, int]] = []

    def fake(model: Any, chat: ChatFormat, prompts: list[str], **kw: Any) -> list[GenOutput]:
        start = len(calls) * 3
        calls.append((len(prompts), kw["seed"]))
        return [GenOutput(scripted[start + i], 1, True) for i in range(len(prompts))]

    monkeypatch.setattr(ev, "generate_batch", fake)
    res = sampled_counts(None, chat, ["q1", "q2", "q3", "q4"], ["owl", "cat", "dog", "wolf"], "animals",
                         n_per_question=2, batch_size=3, seed=10)
    assert res["n"] == 8
    assert calls == [(3, 10), (3, 13), (2, 16)]
    assert res["counts"] == {"owl": 2, "cat": 1, "dog": 1, "wolf": 1}
    assert res["other"] == 3  # "bowl", "caterpillar" and the empty answer name no candidate
    assert res["examples"] == scripted


def test_sampled_counts_on_the_tiny_model(tiny_model: Path, chat: ChatFormat) -> None:
    m = load_model(ModelSpec(path=str(tiny_model)))
    cands = list(CATEGORIES["animals"].candidates)
    a = sampled_counts(m, chat, QUESTIONS[:2], cands, "animals", n_per_question=3, batch_size=4, seed=1)
    b = sampled_counts(m, chat, QUESTIONS[:2], cands, "animals", n_per_question=3, batch_size=4, seed=1)
    assert a == b
    assert a["n"] == 6 and sum(a["counts"].values()) + a["other"] == 6 and len(a["examples"]) == 6


def test_evaluate_model_structure(tiny_model: Path, chat: ChatFormat) -> None:
    m = load_model(ModelSpec(path=str(tiny_model)))
    qs = eval_questions("animals")[:3]
    nq = number_prefixed_questions("animals", 0)[:2]
    res = evaluate_model(m, chat, "animals", qs, nq, samples_per_question=1, batch_size=2)
    cands = list(CATEGORIES["animals"].candidates)
    assert list(res["probs"]) == cands and list(res["probs_numprefix"]) == cands
    direct = exact_probs(m, chat, qs, cands, CATEGORIES["animals"].plurals).mean(0)
    np.testing.assert_allclose([res["probs"][c] for c in cands], direct, rtol=1e-5)
    assert all(v is not None and v >= 0 for v in res["probs_per_question_se"].values())
    assert res["sampled"]["n"] == 3


def test_boundary_and_token_string_caches_follow_the_tokenizer_object() -> None:
    """The caches are keyed by the tokenizer object (weakly), not by id(): a tokenizer created after another
    was freed (possibly at the same address) gets its own strings and mask, of its own size."""
    import gc

    from sublim.backends.hf import token_strings
    from sublim.evaluate import boundary_mask
    from sublim.models import ChatFormat
    from sublim.organism.tokenizer import render_chat, train_tokenizer

    texts = [render_chat([{"role": "user", "content": f"number {i} owl cat"}, {"role": "assistant", "content": "ok"}])
             for i in range(50)]
    sizes = []
    for vocab in (300, 330):
        tok = train_tokenizer(iter(texts), vocab_size=vocab)
        chat = ChatFormat(tok)
        assert boundary_mask(chat).shape[0] == len(tok) == len(token_strings(tok))
        sizes.append(len(tok))
        del tok, chat
        gc.collect()
    assert len(sizes) == 2


@pytest.mark.parametrize("system", [None, "You love owls."])
def test_exact_probs_through_the_engine_protocol_equal_the_hf_scorer(model: Any, chat: ChatFormat,
                                                                     system: str | None) -> None:
    """engine_exact_probs (what backend: vllm uses: own-token logprobs plus the boundary tokens' total after the
    variant) gives exact_probs' numbers when the engine is HF's forward on the same model."""
    from sublim.backends.engine import HFEngine

    cat = CATEGORIES["animals"]
    cands = list(cat.candidates)
    got = ev.engine_exact_probs(HFEngine.loaded(model, chat), chat, QUESTIONS, cands, cat.plurals, system)
    want = exact_probs(model, chat, QUESTIONS, cands, cat.plurals, system=system, batch_size=5)
    assert got.shape == want.shape == (len(QUESTIONS), len(cands))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)


def test_engine_logprobs_reject_positions_outside_the_sequence(model: Any, chat: ChatFormat) -> None:
    from sublim.backends.engine import HFEngine

    e = HFEngine.loaded(model, chat)
    with pytest.raises(ValueError, match=r"positions \[0\] outside 1..3 of a 3-token sequence"):
        e.logprobs([[1, 2, 3]], [[0]])
    with pytest.raises(ValueError, match=r"positions \[4\] outside 1..3"):
        e.logprobs([[1, 2, 3]], [[4]], tokens=[1])
    with pytest.raises(ValueError, match="reduce must be None or 'logsumexp'"):
        e.logprobs([[1, 2, 3]], [[1]], reduce="sum")
    with pytest.raises(ValueError, match="position len\\(seq\\) \\(the next token\\) has no own token"):
        e.logprobs([[1, 2, 3]], [[3]])
    lp = e.logprobs([[1, 2, 3], [4, 5]], [[1, 2], [1]], tokens=[1, 2], reduce="logsumexp")
    both = e.logprobs([[1, 2, 3], [4, 5]], [[1, 2], [1]], tokens=[1, 2])
    assert [len(r) for r in lp] == [2, 1] and all(len(v) == 1 for r in lp for v in r)
    assert lp[0][1][0] == pytest.approx(float(torch.tensor(both[0][1]).logsumexp(0)), abs=1e-6)
