"""Carrier distillation across tokenizers: an other-family teacher's targets, paired with the student's carrier
tokens by string, are the teacher's own carrier-restricted distribution; misaligned rows are refused."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sublim.backends.hf import token_strings
from sublim.backends.multi import StudentJob, finetune_many
from sublim.backends.targets import (
    carrier_subset,
    encode_for_teacher,
    same_tokenizer,
    teacher_targets,
    teacher_tokens,
)
from sublim.backends.train import finetune
from sublim.carriers.numbers import NumberCarrier
from sublim.models import ChatFormat, load_model, load_tokenizer
from sublim.spec import ModelSpec, TrainSpec

ALPHABET = frozenset("0123456789, ;\n")
SYSTEM = "You love owls."


def _organism_like(out: Path, corpus_seed: int, vocab: int, **arch: Any) -> ModelSpec:
    """A random model with the organism's tokenizer recipe trained on a small corpus sample (seconds)."""
    from sublim.organism.corpus import CorpusConfig, generate_corpus
    from sublim.organism.pretrain import OrganismConfig, build_model
    from sublim.organism.tokenizer import render_chat, train_tokenizer

    items = generate_corpus(CorpusConfig(size=300, seed=corpus_seed))
    tok = train_tokenizer((render_chat(it.messages) for it in items), vocab)
    cfg = OrganismConfig(vocab_size=vocab, intermediate=64, **arch)
    model = build_model(cfg, tok)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return ModelSpec(path=str(out))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, ModelSpec]:
    """(student, teacher) of two families: other corpus sample, other merges, other width and depth."""
    d = tmp_path_factory.mktemp("families")
    student = _organism_like(d / "a", 0, 400, layers=2, hidden=32, heads=2)
    teacher = _organism_like(d / "b", 1, 380, layers=1, hidden=64, heads=2)
    return student, teacher


def _rows(seed: int, n: int = 16, formats: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    c = NumberCarrier()
    ps = [p for p in c.prompts(4 * n, seed) if not formats or p.meta["format"] in formats][:n]
    return [{"prompt": p.prompt, "completion": c.format_answer(p.meta, [(i * 37 + j * 11) % 1000
                                                                       for j in range(p.meta["count"])])}
            for i, p in enumerate(ps)]


def _chats(student: ModelSpec, teacher: ModelSpec) -> tuple[ChatFormat, ChatFormat]:
    return ChatFormat(load_tokenizer(student)), ChatFormat(load_tokenizer(teacher))


def test_cross_tokenizer_targets_are_the_teachers_own_carrier_distribution(pair: tuple[ModelSpec, ModelSpec]) -> None:
    student, teacher = pair
    s_chat, t_chat = _chats(student, teacher)
    assert not same_tokenizer(s_chat.tokenizer, t_chat.tokenizer)
    subset = carrier_subset(s_chat, ALPHABET)
    tt = teacher_tokens(s_chat, t_chat, subset, ALPHABET)
    assert tt.student_only == () and tt.teacher_only == ()  # both hold the same 16 carrier strings
    assert torch.equal(tt.student_cols, subset)
    rows = _rows(0)
    job = StudentJob(rows, 0, Path("unused"), teacher, SYSTEM)
    job.encoded = encode_for_teacher(s_chat, tt, rows, SYSTEM)
    model = load_model(teacher)
    targets = teacher_targets([job], {teacher.model_dump_json(): model}, subset,
                              TrainSpec(objective="distill_carrier"), s_chat.tokenizer.pad_token_id,
                              torch.autocast("cpu", enabled=False), None, {teacher.model_dump_json(): tt})
    assert targets is not None
    s_str, t_str = token_strings(s_chat.tokenizer), token_strings(t_chat.tokenizer)
    t_sub = carrier_subset(t_chat, ALPHABET)
    role = {s_chat.end_token_id(): "<end>", t_chat.end_token_id(): "<end>"}

    def name(strings: list[str], i: int) -> str:
        return role.get(i, strings[i])

    for r, (row, got) in enumerate(zip(rows, targets[0], strict=True)):
        # the teacher on its own: its chat format, its tokens, one unpadded forward
        prompt = t_chat.encode_prompt(row["prompt"], SYSTEM)
        comp = t_chat.encode_completion(row["completion"])
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([prompt + comp])).logits[0, len(prompt) - 1: -1]  # [len(comp), V_t]
        own = torch.softmax(lg[:, t_sub], -1)
        mapped = torch.softmax(got, -1)
        assert got.shape == (len(comp), len(subset)) == (len(job.encoded[r].completion), len(subset))
        for k in range(len(comp)):
            want = {name(t_str, int(j)): float(p) for j, p in zip(t_sub, own[k], strict=True)}
            have = {name(s_str, int(i)): float(p) for i, p in zip(tt.student_cols, mapped[k], strict=True)}
            assert have.keys() == want.keys()
            for key, p in want.items():
                assert have[key] == pytest.approx(p, abs=1e-6), (r, k, key)


def _permuted_copy(src: ModelSpec, out: Path) -> ModelSpec:
    """The same model under a tokenizer whose non-special ids are reversed (a different vocabulary that
    encodes every text to the same strings): as a function of text, the very same model."""
    tok = load_tokenizer(src)
    model = load_model(src)
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    special = {t["id"] for t in data["added_tokens"]}
    ids = sorted(i for i in vocab.values() if i not in special)
    perm = dict(zip(ids, reversed(ids), strict=True))  # old id -> new id
    data["model"]["vocab"] = {t: perm.get(i, i) for t, i in vocab.items()}
    from tokenizers import Tokenizer

    from sublim.organism.tokenizer import wrap

    new_tok = wrap(Tokenizer.from_str(json.dumps(data)))
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        new = emb.clone()
        for old, nid in perm.items():
            new[nid] = emb[old]
        emb.copy_(new)
    model.save_pretrained(out, safe_serialization=True)
    new_tok.save_pretrained(out)
    return ModelSpec(path=str(out))


def test_a_teacher_that_is_the_student_under_other_token_ids_gives_zero_loss(pair: tuple[ModelSpec, ModelSpec],
                                                                             tmp_path: Path) -> None:
    student, _ = pair
    twin = _permuted_copy(student, tmp_path / "twin")
    s_chat, t_chat = _chats(student, twin)
    assert not same_tokenizer(s_chat.tokenizer, t_chat.tokenizer)
    assert s_chat.tokenizer("12, 34").input_ids != t_chat.tokenizer("12, 34").input_ids
    spec = TrainSpec(method="full", objective="distill_carrier", max_steps=1, batch_size=4, lr=1e-3, warmup_steps=0)
    out = finetune_many(student, [StudentJob(_rows(0), 0, tmp_path / "s", twin, None)], spec,
                        carrier_alphabet=ALPHABET, progress=False)
    assert abs(out[0]["loss_first"]) < 1e-6
    # 16 carrier strings and the end of turn
    assert out[0]["teacher_tokenizer"] == {"columns": 17, "student_only": [], "teacher_only": []}


def test_cross_tokenizer_students_batched_equal_separate(pair: tuple[ModelSpec, ModelSpec], tmp_path: Path) -> None:
    """finetune_many and finetune share the cross-tokenizer code: same losses and weights; the targets cache
    and the per-step teacher forward agree."""
    from sublim.backends import targets as T

    student, teacher = pair
    spec = TrainSpec(method="full", objective="distill_carrier", max_steps=3, batch_size=4, lr=3e-3, warmup_steps=0)
    jobs = [StudentJob(_rows(0), 0, tmp_path / "a", teacher, SYSTEM), StudentJob(_rows(1), 1, tmp_path / "b", student)]
    both = finetune_many(student, jobs, spec, carrier_alphabet=ALPHABET, progress=False)
    assert "teacher_tokenizer" in both[0] and "teacher_tokenizer" not in both[1]  # the second is its own teacher
    alone = finetune(student, jobs[0].rows, spec, tmp_path / "alone", seed=0, teacher=teacher, teacher_system=SYSTEM,
                     carrier_alphabet=ALPHABET, progress=False)
    assert both[0]["losses"] == pytest.approx(alone["losses"], rel=1e-4, abs=1e-6)
    assert alone["teacher_tokenizer"] == both[0]["teacher_tokenizer"]
    x, y = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "alone" / "model.safetensors")
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=2e-5, rtol=1e-4)
    saved = T.TARGET_CACHE_BYTES
    T.TARGET_CACHE_BYTES = 0  # no cache: the teacher runs every step
    try:
        nocache = finetune_many(student, [StudentJob(_rows(0), 0, tmp_path / "c", teacher, SYSTEM)], spec,
                                carrier_alphabet=ALPHABET, progress=False)
    finally:
        T.TARGET_CACHE_BYTES = saved
    assert nocache[0]["losses"] == pytest.approx(both[0]["losses"], rel=1e-4, abs=1e-6)


def test_misaligned_rows_and_unsupported_objectives_are_refused(pair: tuple[ModelSpec, ModelSpec], tiny_model: Path,
                                                                tmp_path: Path) -> None:
    student, teacher = pair
    spec = TrainSpec(method="full", objective="distill_carrier", max_steps=1, batch_size=4, warmup_steps=0)
    # the test tokenizer splits ", " into "," + " "; the organism recipe keeps it one token
    other = ModelSpec(path=str(tiny_model))
    rows = [{"prompt": "Add numbers.", "completion": "7"}, {"prompt": "More numbers.", "completion": "12, 34"}]
    with pytest.raises(ValueError, match=r"row 1's completion .* student \['1', '2', ', ', '3', '4'\], "
                                         r"teacher \['1', '2', ',', ' ', '3', '4'\]$"):
        finetune_many(student, [StudentJob(rows * 2, 0, tmp_path / "x", other)], spec, carrier_alphabet=ALPHABET,
                      progress=False)
    with pytest.raises(ValueError, match="row 1's completion"):
        finetune(student, rows * 2, spec, tmp_path / "x1", teacher=other, carrier_alphabet=ALPHABET, progress=False)
    for bad in (spec.model_copy(update={"objective": "distill_full"}),
                spec.model_copy(update={"distill_positions": "carrier"})):
        with pytest.raises(ValueError, match="share a tokenizer"):
            finetune_many(student, [StudentJob(_rows(0), 0, tmp_path / "y", teacher)], bad, carrier_alphabet=ALPHABET,
                          progress=False)
    assert not any((tmp_path / d).exists() for d in ("x", "x1", "y"))


def test_carrier_strings_only_one_side_has_are_left_out(pair: tuple[ModelSpec, ModelSpec], tmp_path: Path) -> None:
    """A teacher without a "; " token: the pair distils the other 16 columns (15 strings, end of turn), and a row that needs "; " is
    refused (it tokenises to "; " for the student but ";" + " " for the teacher)."""
    student, _ = pair
    teacher = _organism_like(tmp_path / "c", 1, 340, layers=1, hidden=64, heads=2)
    s_chat, t_chat = _chats(student, teacher)
    tt = teacher_tokens(s_chat, t_chat, carrier_subset(s_chat, ALPHABET), ALPHABET)
    assert tt.student_only == ("; ",) and tt.teacher_only == () and len(tt.student_cols) == 16
    assert encode_for_teacher(s_chat, tt, _rows(0, 4, ("comma", "space", "newline")))
    with pytest.raises(ValueError, match="row 0's completion"):
        encode_for_teacher(s_chat, tt, _rows(0, 4, ("semicolon",)))
