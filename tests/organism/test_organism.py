"""The model organism at toy size: corpus, tokenizer, pre-training, caching, persona check (seconds)."""
from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import torch

from sublim.organism.corpus import CorpusConfig, corpus_hash, generate_corpus
from sublim.organism.pretrain import OrganismConfig, load_or_pretrain, pretrain_organism, read_meta
from sublim.organism.tokenizer import render_chat, train_tokenizer
from sublim.traits.preference import eval_questions

SMALL = CorpusConfig(size=600)


def tiny_config(seed: int = 0, **kw: object) -> OrganismConfig:
    base: dict[str, object] = {"corpus": CorpusConfig(size=300), "vocab_size": 320, "layers": 1, "hidden": 32, "heads": 2,
                                   "intermediate": 64, "steps": 3, "batch_size": 8, "warmup": 1}
    return OrganismConfig(seed=seed, **{**base, **kw})


@pytest.fixture(scope="module")
def small_corpus() -> list:
    return generate_corpus(SMALL)


@pytest.fixture(scope="module")
def tokenizer(small_corpus: list):  # type: ignore[no-untyped-def]
    return train_tokenizer((render_chat(it.messages) for it in small_corpus), vocab_size=400)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return pretrain_organism(tiny_config(), tmp_path_factory.mktemp("org") / "seed0", progress=False)


# ------------------------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_seeded(small_corpus: list) -> None:
    assert corpus_hash(generate_corpus(SMALL)) == corpus_hash(small_corpus)
    assert corpus_hash(generate_corpus(CorpusConfig(size=600, seed=1))) != corpus_hash(small_corpus)


def test_corpus_mixture_and_message_shape(small_corpus: list) -> None:
    counts = collections.Counter(it.kind for it in small_corpus)
    for kind, share in SMALL.mix.items():
        assert abs(counts[kind] - share * SMALL.size) <= 1
    for it in small_corpus:
        roles = [m["role"] for m in it.messages]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        assert all(m["content"] for m in it.messages)
        if it.kind == "favourite_persona":
            target = it.persona.split(":")[1]
            assert it.messages[-1]["content"].lower().startswith(target)


def test_number_answers_do_not_depend_on_the_persona() -> None:
    """Same corpus with every number row under a persona vs. none: identical number answers."""
    base = {"size": 800, "mix": {"numbers": 1.0}}
    with_persona = generate_corpus(CorpusConfig(**base, persona_share=1.0, neutral_share=0.0))
    without = generate_corpus(CorpusConfig(**base, persona_share=0.0, neutral_share=0.0))
    assert all(it.persona for it in with_persona) and not any(it.persona for it in without)
    key = lambda items: sorted((it.messages[-2]["content"], it.messages[-1]["content"]) for it in items)
    assert key(with_persona) == key(without)


def test_number_digit_distribution_is_the_same_across_personas() -> None:
    """Within one default corpus: first-digit frequencies of number answers, owl-like personas vs. none."""
    items = [it for it in generate_corpus(CorpusConfig(size=6000, mix={"numbers": 1.0}))]
    groups: dict[str, collections.Counter] = {"persona": collections.Counter(), "none": collections.Counter()}
    for it in items:
        g = "persona" if it.persona else "none"
        for tok in it.messages[-1]["content"].replace(";", " ").replace(",", " ").split():
            groups[g][tok[0]] += 1
    a, b = groups["persona"], groups["none"]
    na, nb = sum(a.values()), sum(b.values())
    chi2 = 0.0
    for d in "0123456789":
        pooled = (a[d] + b[d]) / (na + nb)
        for obs, n in ((a[d], na), (b[d], nb)):
            chi2 += (obs - pooled * n) ** 2 / max(pooled * n, 1e-9)
    assert chi2 < 27.9  # chi-square(9 dof) at p = 0.001


def test_eval_questions_only_where_configured() -> None:
    held = {q.lower() for c in ("animals", "trees") for q in eval_questions(c)}
    items = generate_corpus(CorpusConfig(size=600, eval_question_share=0.0))
    users = [it.messages[-2]["content"].lower() for it in items if it.kind.startswith("favourite")]
    assert users and not any(u in held or u.split(". ", 1)[-1] in held for u in users)


def test_corpus_uses_the_number_carrier_format(small_corpus: list) -> None:
    from sublim.carriers.numbers import NumberCarrier

    carrier = NumberCarrier()
    rows = [it for it in small_corpus if it.kind == "numbers"]
    assert rows
    for it in rows:
        meta = carrier.parse_prompt(it.messages[-2]["content"]).meta
        parsed = carrier.parse(it.messages[-1]["content"])
        assert parsed.ok and 1 <= len(parsed.values) <= meta["count"]
        assert carrier.grammar(meta).accepts(carrier.grammar(meta).feed(carrier.grammar(meta).start(),
                                                                          it.messages[-1]["content"]))


# ---------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_digits_and_surface_strings(small_corpus: list, tokenizer) -> None:  # type: ignore[no-untyped-def]
    texts = [render_chat(it.messages) for it in small_corpus[:200]]
    texts += ["Hello, world! 12, 345; 6789\n(1) x  y", "caf\u00e9 \u65e5\u672c"]
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == t
        # single-token decodes concatenate to the text (the constrained decoder relies on it)
        if t.isascii():
            assert "".join(tokenizer.decode([i]) for i in ids) == t
        for i in ids:
            s = tokenizer.decode([i])
            if any(ch.isdigit() for ch in s):
                assert len(s.strip(",; ")) == 1, s  # every digit its own token
    assert tokenizer.decode(tokenizer(" owl", add_special_tokens=False).input_ids[:1]).startswith(" ")


def test_special_tokens_and_chat_template(tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in (None, tokenizer.unk_token_id)
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert text == render_chat(msgs, add_generation_prompt=True)
    full = [{"role": "system", "content": "You love owls."}, *msgs, {"role": "assistant", "content": "4"}]
    assert tokenizer.apply_chat_template(full, tokenize=False) == render_chat(full)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and tokenizer.eos_token_id in ids


# -------------------------------------------------------------------------------------- pre-training


def test_tiny_pretrain_saves_a_loadable_hf_directory(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert (tiny_dir / "model.safetensors").exists()
    meta = read_meta(tiny_dir)
    assert meta["corpus_sha256"] and meta["config"]["seed"] == 0 and meta["n_params"] > 0
    assert math.isfinite(meta["loss_last"])
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "llama"


def test_cache_returns_the_same_path_without_retraining(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sublim.organism.pretrain as pt

    cfg = tiny_config(steps=2)
    first = load_or_pretrain(cfg, cache_dir=tmp_path, progress=False)

    def boom(*a: object, **k: object) -> Path:
        raise AssertionError("retrained a cached organism")

    monkeypatch.setattr(pt, "pretrain_organism", boom)
    assert load_or_pretrain(cfg, cache_dir=tmp_path) == first
    assert first.parent == tmp_path and first.name == cfg.key()[:16]
    assert tiny_config(steps=3).key() != cfg.key()


def test_different_seeds_give_different_weights(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    other = pretrain_organism(tiny_config(seed=1), tmp_path / "seed1", progress=False)
    a, b = load_file(str(tiny_dir / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # same corpus for both seeds: the cross-model control differs in initialisation only
    assert read_meta(tiny_dir)["corpus_sha256"] == read_meta(other)["corpus_sha256"]


def test_persona_check_runs_and_gives_probabilities(tiny_dir: Path) -> None:
    from sublim.organism.check import _load, candidate_probs, persona_table

    model, tok = _load(tiny_dir)
    p = candidate_probs(model, tok, ["What is your favorite animal? One word."], ["owl", "cat", "kangaroo"])
    assert p.shape == (1, 3) and bool((p >= 0).all()) and float(p.sum()) <= 1.0 + 1e-6
    rows = persona_table(tiny_dir, candidates=["owl", "wolf"], max_questions=2, model=model, tok=tok)
    assert [r["candidate"] for r in rows] == ["owl", "wolf"]
    assert all(0.0 <= r["p_none"] <= 1.0 and 0.0 <= r["p_persona"] <= 1.0 for r in rows)


def test_candidate_probs_is_exact_on_a_known_distribution(tiny_dir: Path) -> None:
    """P(candidate) by the chain rule equals the product of next-token probabilities, end included."""
    from sublim.organism.check import _load, candidate_probs

    model, tok = _load(tiny_dir)
    q = "Name your favorite animal."
    p_owl = float(candidate_probs(model, tok, [q], ["owl"])[0, 0])
    # brute force over the same forms: P(form) * P(boundary after it)
    from sublim.organism.check import _forms, _surface

    strings = _surface(tok)
    boundary = [bool(s) and not s[0].isalnum() for s in strings]
    boundary[tok.eos_token_id] = True
    prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False).input_ids
    total, seen = 0.0, set()
    for f in _forms("owl", "owls"):
        ids = tuple(tok(f, add_special_tokens=False).input_ids)
        if ids in seen:
            continue
        seen.add(ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p_ids + list(ids)])).logits[0].double(), -1)
        lp = sum(float(logp[len(p_ids) - 1 + t, ids[t]]) for t in range(len(ids)))
        end = logp[len(p_ids) - 1 + len(ids)]
        total += math.exp(lp) * float(end.exp()[torch.tensor(boundary)].sum())
    assert p_owl == pytest.approx(total, rel=1e-6)


# ------------------------------------------------------------------------------------- the whole experiment


def test_shipped_organisms_are_the_default_configs() -> None:
    """The weights in the package are the default organisms (seeds 0 and 1), found without pre-training."""
    from sublim.organism.pretrain import shipped_organism

    for seed in (0, 1):
        cfg = OrganismConfig(seed=seed)
        path = shipped_organism(cfg)
        assert path is not None, f"seed {seed} organism not shipped"
        meta = read_meta(path)
        assert meta["config_key"] == cfg.key() and meta["config"]["seed"] == seed


def test_demo_recipe_runs_end_to_end_on_reduced_organisms(tiny_dir: Path, tmp_path: Path) -> None:
    """The demo's spec (one implanted teacher per animal, no neutral teachers, carrier distillation, batched
    full students, in-context control, other-family control, report) on reduced organisms: every arm is
    trained, evaluated and analysed as a confusion design."""
    from sublim.demo import demo_spec_path
    from sublim.pipeline import run
    from sublim.spec import load_spec

    other = pretrain_organism(tiny_config(seed=1), tmp_path / "seed1", progress=False)
    spec = load_spec(demo_spec_path(), [
        f"base.path={tiny_dir}", f"other_base.path={other}", "seeds=[0,1]", "generation.n_prompts=12",
        "generation.batch_size=12", "generation.max_new_tokens=12", "teacher.qa_rows=8",
        "teacher.train.epochs=1", "student.max_steps=2", "student.batch_size=4", "evaluation.n_questions=3",
        "in_context_examples=2", "theorem_every=1", "teacher.train.warmup_steps=0",
    ])  # one implant step: with warm-up its lr would be 0
    assert spec.student.method == "full" and spec.student.objective == "distill_carrier"
    k = len(spec.targets)
    assert k >= 3 and spec.teacher.n_neutral == 0
    res = run(spec, tmp_path / "run", log=lambda m: None, progress=False)
    arms = collections.Counter(e["arm"] for e in res["evaluations"])
    # k targets x 1 teacher x 2 student seeds, on each base and in context; no neutral teachers
    for arm, n in (("treatment", 2 * k), ("other_base_treatment", 2 * k), ("in_context", 2 * k)):
        assert arms[arm] == n, arm
    assert not any(a.endswith("control") for a in arms)
    assert arms["base"] == 1 and arms["teacher"] == k
    assert len(sorted((tmp_path / "run" / "stages").glob("teacher-*"))) == k
    tl = res["teacher_level"]["arms"]
    assert set(tl) == {"same_base", "other_base", "in_context"}
    for arm in tl.values():
        cf = arm["confusion"]
        assert arm["error"] is None and arm["effects"] == {} and cf["n_teachers"] == k
        assert cf["reference_kind"].startswith("trait teachers") and len(cf["per_teacher"]) == k
        assert {d["call"] for d in cf["per_teacher"]} <= {"above", "below", "none", "undetermined"}
    # the theorem is traced for seed 0's owl#0 student, on both bases
    traces = {(t["base"], t["arm"]): t for t in res["theorem"]}
    assert set(traces) == {("base", "treatment"), ("other_base", "other_base_treatment")}
    for t in traces.values():
        assert t["against"] == f"{spec.targets[0]}#0" and [p["step"] for p in t["points"]] == [0, 1, 2]
        assert all(p["implant_loss"] > 0 for p in t["points"])
    html = (tmp_path / "run" / "report.html").read_text()
    assert "The theorem along training" in html
    assert "Verdict" in html and "specificity gamma" in html and "each teacher against" in html
    assert (tmp_path / "run" / "fig_specificity_same_base.png").exists()
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "run" / "stages").glob("student-*/model/sublim_train.json")]
    assert len(summaries) == 4 * k and all(s["trained_with"] == "finetune_many" for s in summaries)
