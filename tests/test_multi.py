"""Batched LoRA students: exactly separate fine-tunes, saved in peft's format."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sublim.backends.multi import StudentJob, finetune_many
from sublim.carriers.numbers import NumberCarrier
from sublim.models import load_model
from sublim.spec import ModelSpec, TrainSpec


def _rows(seed: int, n: int = 24) -> list[dict]:
    c = NumberCarrier()
    return [{"prompt": p.prompt, "completion": c.format_answer(p.meta, [(i * 7 + seed * 3 + j) % 997 for j in range(p.meta["count"])])}
            for i, p in enumerate(c.prompts(n, seed))]


SPEC = TrainSpec(lora={"rank": 4, "alpha": 8}, max_steps=5, batch_size=4, lr=5e-3, warmup_steps=0)


def test_batched_equals_separate(tiny_model: Path, tmp_path: Path) -> None:
    base = ModelSpec(path=str(tiny_model))
    both = finetune_many(base, [StudentJob(_rows(0), 0, tmp_path / "a"), StudentJob(_rows(1), 1, tmp_path / "b")],
                         SPEC, progress=False)
    alone = finetune_many(base, [StudentJob(_rows(1), 1, tmp_path / "b1")], SPEC, progress=False)
    x = load_file(tmp_path / "b" / "adapter_model.safetensors")
    y = load_file(tmp_path / "b1" / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=1e-5, rtol=1e-4)
    assert both[1]["losses"] == pytest.approx(alone[0]["losses"], rel=1e-4)
    # the two students differ (own data, own seed) and training moved B away from zero
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], x[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in x.items() if "lora_B" in k)


def test_saved_adapter_loads_in_peft_and_records_base(tiny_model: Path, tmp_path: Path) -> None:
    import json

    base = ModelSpec(path=str(tiny_model))
    finetune_many(base, [StudentJob(_rows(0), 0, tmp_path / "s")], SPEC, progress=False)
    cfg = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model)
    m0 = load_model(base)
    m1 = load_model(base.model_copy(update={"adapter": str(tmp_path / "s")}))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert (m0(ids).logits - m1(ids).logits).abs().max() > 1e-4


def test_peft_forward_matches_stacked_forward(tiny_model: Path, tmp_path: Path) -> None:
    """The adapter as peft loads it computes what the batched model trained."""
    from sublim.backends import multi

    base = ModelSpec(path=str(tiny_model))
    captured: dict = {}
    orig = multi._save

    def spy(model, stacked, names, s, job, *a, **k):  # type: ignore[no-untyped-def]
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            model.eval()
            captured["logits"] = model(input_ids=ids).logits.clone()
        return orig(model, stacked, names, s, job, *a, **k)

    multi._save = spy
    try:
        finetune_many(base, [StudentJob(_rows(0), 0, tmp_path / "s")], SPEC, progress=False)
    finally:
        multi._save = orig
    m1 = load_model(base.model_copy(update={"adapter": str(tmp_path / "s")}))
    torch.testing.assert_close(m1(torch.tensor([[5, 6, 7, 8, 9]])).logits, captured["logits"], atol=1e-4, rtol=1e-4)


def test_unequal_steps_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    base = ModelSpec(path=str(tiny_model))
    spec = TrainSpec(lora={"rank": 2, "alpha": 2}, epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="same number of steps"):
        finetune_many(base, [StudentJob(_rows(0, 8), 0, tmp_path / "a"), StudentJob(_rows(1, 24), 1, tmp_path / "b")],
                      spec, progress=False)


@pytest.mark.parametrize(("objective", "defended"), [("sft", False), ("distill_carrier", False),
                                                      ("distill_full", False), ("distill_carrier", True)])
def test_batched_full_equals_separate_finetunes(tiny_model: Path, tiny_model_b: Path, tmp_path: Path,
                                                objective: str, defended: bool) -> None:
    """Full students stacked in one model give the weights and losses of one-at-a-time fine-tunes (the
    teacher's targets cached once per row change nothing); tied embeddings stay tied when saved. ``defended``:
    with the soft-label defences (temperature, top-k) and the KL-to-base anchor on neutral rows."""
    from safetensors.torch import load_file

    from sublim.backends.train import finetune
    from sublim.runs import write_jsonl

    base = ModelSpec(path=str(tiny_model))
    teacher = ModelSpec(path=str(tiny_model_b)) if objective != "sft" else None
    extra = {}
    if defended:
        write_jsonl(tmp_path / "neutral.jsonl", [{"prompt": f"Say something about day {i}.",
                                                  "completion": f"Day {i} was calm and bright."} for i in range(6)])
        extra = {"distill_temperature": 0.5, "distill_top_k": 3, "kl_base": 0.5,
                 "kl_base_data": str(tmp_path / "neutral.jsonl"), "kl_base_batch": 2}
    spec = TrainSpec(method="full", objective=objective, max_steps=4, batch_size=4, lr=3e-3, warmup_steps=0,
                     max_grad_norm=0.5, **extra)
    alphabet = frozenset("0123456789, ;\n")
    jobs = [StudentJob(_rows(0), 0, tmp_path / "a", teacher, "You love owls." if teacher else None),
            StudentJob(_rows(1), 1, tmp_path / "b", teacher, None)]
    both = finetune_many(base, jobs, spec, carrier_alphabet=alphabet, progress=False)
    for k, job in enumerate(jobs):
        alone = finetune(base, job.rows, spec, tmp_path / f"alone{k}", seed=job.seed, teacher=teacher,
                         teacher_system=job.teacher_system, carrier_alphabet=alphabet, progress=False)
        assert both[k]["losses"] == pytest.approx(alone["losses"], rel=1e-4, abs=1e-6)
        x = load_file(job.out_dir / "model.safetensors")
        y = load_file(tmp_path / f"alone{k}" / "model.safetensors")
        assert x.keys() == y.keys()
        for name in x:
            torch.testing.assert_close(x[name], y[name], atol=2e-5, rtol=1e-4)
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # own data, own order
    m = load_model(ModelSpec(path=str(tmp_path / "a")))
    assert m.config.tie_word_embeddings == load_model(base).config.tie_word_embeddings


def test_full_batching_refuses_unknown_modules() -> None:
    from sublim.backends.multi import stack_full

    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="cannot batch module ''"):
        stack_full(Odd(), 2)


def test_distill_carrier_batched(tiny_model: Path, tiny_model_b: Path, tmp_path: Path) -> None:
    base = ModelSpec(path=str(tiny_model))
    teacher = ModelSpec(path=str(tiny_model))
    spec = SPEC.model_copy(update={"objective": "distill_carrier"})
    alphabet = frozenset("0123456789, ;\n")
    out = finetune_many(base, [StudentJob(_rows(0), 0, tmp_path / "d", teacher, "You love owls.")], spec,
                        carrier_alphabet=alphabet, progress=False)
    assert out[0]["loss_first"] >= 0 and out[0]["steps"] == 5


def test_position_logits_match_completion_logits_and_align_with_a_system_prompt(tiny_model: Path) -> None:
    """The logits at a row's completion positions are the same whichever way the row is laid out, and a
    teacher with a system prompt is read at the same tokens as the student (aligned from the prompt's end)."""
    from sublim.backends.multi import carrier_positions, position_logits
    from sublim.backends.train import completion_logits, encode_rows
    from sublim.models import ChatFormat, load_tokenizer

    spec = ModelSpec(path=str(tiny_model))
    model = load_model(spec)
    chat = ChatFormat(load_tokenizer(spec))
    enc = encode_rows(chat, _rows(0, 6), None, "You love owls.")
    allowed = set(range(model.config.vocab_size))
    with torch.no_grad():
        a = completion_logits(model, [e.prompt for e in enc], [e.completion for e in enc], 0)
        pos = [carrier_positions(e, allowed) for e in enc]
        b = position_logits(model, [e.prompt + e.completion for e in enc], pos, 0)
        comp_rows = torch.cat([torch.arange(len(p) - len(e.completion), len(p)) + sum(map(len, pos[:i]))
                               for i, (p, e) in enumerate(zip(pos, enc, strict=True))])
        torch.testing.assert_close(b[comp_rows], a, atol=1e-4, rtol=1e-4)
    for e, p in zip(enc, pos, strict=True):
        assert len(e.teacher_prompt) > len(e.prompt)  # the system prompt
        shift = len(e.teacher_prompt) - len(e.prompt)
        seq, tseq = e.prompt + e.completion, e.teacher_prompt + e.completion
        prompt_pos = p[: len(p) - len(e.completion)]
        assert prompt_pos, "the user turn's tokens are distilled too"
        assert all(seq[t] == tseq[t + shift] and seq[t - 1] == tseq[t - 1 + shift] for t in prompt_pos)


def test_carrier_positions_students_train(tiny_model: Path, tiny_model_b: Path, tmp_path: Path) -> None:
    base = ModelSpec(path=str(tiny_model))
    spec = TrainSpec(method="full", objective="distill_carrier", distill_positions="carrier", max_steps=3,
                     batch_size=4, lr=1e-3, warmup_steps=0)
    out = finetune_many(base, [StudentJob(_rows(0), 0, tmp_path / "p", ModelSpec(path=str(tiny_model_b)),
                                          "You love owls.")], spec,
                        carrier_alphabet=frozenset("0123456789, ;\n"), progress=False)
    assert out[0]["loss_first"] > 0 and out[0]["completion_tokens"] > 0
    with pytest.raises(ValueError, match="distill_carrier"):
        TrainSpec(objective="sft", distill_positions="carrier")


@pytest.mark.parametrize("positions", ["completion", "carrier"])
def test_carrier_head_equals_the_full_head(tiny_model: Path, tiny_model_b: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, positions: str) -> None:
    """distill_carrier with the LM head on the carrier columns only (and whole-sequence padding) trains the
    students the full-vocabulary head trains, up to float summation order; the fast path is really taken."""
    from sublim.backends import multi

    base = ModelSpec(path=str(tiny_model))
    teacher = ModelSpec(path=str(tiny_model_b))
    spec = TrainSpec(method="full", objective="distill_carrier", max_steps=4, batch_size=4, lr=3e-3, warmup_steps=0,
                     max_grad_norm=0.5, distill_positions=positions)
    alphabet = frozenset("0123456789, ;\n")

    def jobs(tag: str) -> list[StudentJob]:
        return [StudentJob(_rows(s), s, tmp_path / f"{tag}{s}", teacher, None) for s in range(3)]

    taken = []
    real = multi._carrier_head
    monkeypatch.setattr(multi, "_carrier_head", lambda *a: taken.append(real(*a)) or taken[-1])
    fast = finetune_many(base, jobs("f"), spec, carrier_alphabet=alphabet, progress=False)
    assert taken and all(t is not None for t in taken)
    monkeypatch.setattr(multi, "_carrier_head", lambda *a: None)
    slow = finetune_many(base, jobs("s"), spec, carrier_alphabet=alphabet, progress=False)
    for s in range(3):
        assert fast[s]["losses"] == pytest.approx(slow[s]["losses"], rel=1e-5, abs=1e-7)
        x, y = load_file(tmp_path / f"f{s}" / "model.safetensors"), load_file(tmp_path / f"s{s}" / "model.safetensors")
        for name in x:
            torch.testing.assert_close(x[name], y[name], atol=1e-5, rtol=1e-4)


def test_packed_rows_see_only_their_own_row(tiny_model: Path) -> None:
    """Rows packed end to end per student (sublim.backends.packed) get the hidden states each row gets alone:
    attention never crosses a row, positions restart per row, and the padding tail changes nothing."""
    from sublim.backends.packed import pack_rows, packed_hidden

    model = load_model(ModelSpec(path=str(tiny_model)))
    g = torch.Generator().manual_seed(0)
    lens = [5, 11, 3, 9, 7, 2]  # 2 students x 3 rows; student 0 has 19 tokens, student 1 has 18
    seqs = [torch.randint(5, 200, (n,), generator=g).tolist() for n in lens]
    rows = pack_rows(seqs, 2, pad=0)
    assert rows.ids.shape == (2, 19) and rows.gather.shape == (6, 11)
    with torch.no_grad():
        h = packed_hidden(model, rows)
        for r, x in enumerate(seqs):
            alone = model.model(input_ids=torch.tensor([x])).last_hidden_state[0]
            got = h[torch.tensor([rows.flat(r, t) for t in range(len(x))])]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)
    assert model.config._attn_implementation != "sublim_rows"  # restored after the packed forward
    with pytest.raises(ValueError, match="do not split into 4 students"):
        pack_rows(seqs, 4, pad=0)


def test_batched_implants_equal_separate_implants(tiny_model: Path, tmp_path: Path) -> None:
    """Round 0 of several full implants trained as one batched model is each implant as ``implant_teacher``
    trains it alone (its own Q&A sample and seed), up to float summation order; ``implant_teacher`` then
    reuses the batched round instead of training it again."""
    from sublim.spec import TeacherSpec
    from sublim.teachers import implant_first_rounds, implant_teacher

    base = ModelSpec(path=str(tiny_model))
    spec = TeacherSpec(kind="finetuned", qa_rows=24, max_rounds=1, min_target_prob=0.0,
                       train=TrainSpec(method="full", epochs=2, lr=3e-3, batch_size=8, warmup_steps=0))
    items = [("owl", 0, tmp_path / "owl0"), ("lion", 1, tmp_path / "lion1")]
    implant_first_rounds(base, "animals", items, spec, progress=False)
    alone = tmp_path / "alone"
    implant_teacher(base, "animals", "lion", spec, alone, log=lambda _: None, replicate=1)
    x = load_file(tmp_path / "lion1" / "round0" / "model.safetensors")
    y = load_file(alone / "round0" / "model.safetensors")
    for name in x:
        torch.testing.assert_close(x[name], y[name], atol=1e-5, rtol=1e-4)
    o = load_file(tmp_path / "owl0" / "round0" / "model.safetensors")
    assert any(not torch.equal(o[n], x[n]) for n in x)  # the two implants are their own draws
    before = (tmp_path / "owl0" / "round0" / "model.safetensors").stat().st_mtime_ns
    _, summary = implant_teacher(base, "animals", "owl", spec, tmp_path / "owl0", log=lambda _: None)
    assert (tmp_path / "owl0" / "round0" / "model.safetensors").stat().st_mtime_ns == before
    assert summary["rounds"][0]["round"] == 0
