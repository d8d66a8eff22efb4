"""Fine-tuning: loss on the completion span only, LoRA and full saves, determinism, distillation objectives."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sublim.backends import train
from sublim.backends.hf import token_strings
from sublim.backends.train import completion_logits, encode_rows, finetune, step_loss, student_spec
from sublim.models import ChatFormat, load_model, load_tokenizer
from sublim.spec import ModelSpec, TrainSpec

torch.set_num_threads(1)

ROWS = [
    {"prompt": "Here is a list of numbers: 123, 456. Add up to 3 more numbers. Separate them with commas.",
     "completion": "7, 77, 777"},
    {"prompt": "Owl.", "completion": "7"},
    {"prompt": "Take the sequence 1, 2, 3. Continue it with no more than 5 new numbers. Use spaces.",
     "completion": "4 5 6 7 8"},
    {"prompt": "Numbers please.", "completion": ""},
]


def _spec(**kw: Any) -> TrainSpec:
    base: dict[str, Any] = {"method": "lora", "lora": {"rank": 2, "alpha": 4}, "max_steps": 3, "batch_size": 4,
                            "lr": 1e-2, "warmup_steps": 0, "schedule": "constant"}
    return TrainSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def base(tiny_model: Path) -> ModelSpec:
    return ModelSpec(path=str(tiny_model))


@pytest.fixture(scope="module")
def lm(base: ModelSpec) -> tuple[Any, ChatFormat]:
    return load_model(base), ChatFormat(load_tokenizer(base))


def _adapter(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------ completion span


def test_completion_logits_match_unpadded_forwards(lm: tuple[Any, ChatFormat]) -> None:
    """Left-padded prompts + right-padded completions give, row by row, the logits of a plain forward."""
    model, _ = lm
    prompts, comps = [[1, 2, 3], [4, 5, 6, 7, 8], [9]], [[10, 11], [12], [13, 14, 15]]
    got = completion_logits(model, prompts, comps, pad=0)
    assert got.shape[0] == 6
    k = 0
    for p, c in zip(prompts, comps):
        full = model(input_ids=torch.tensor([p + c])).logits[0]
        for j in range(len(c)):
            torch.testing.assert_close(got[k], full[len(p) - 1 + j], atol=1e-4, rtol=1e-4)
            k += 1


def test_encode_rows(lm: tuple[Any, ChatFormat]) -> None:
    _, chat = lm
    enc = encode_rows(chat, ROWS)
    end = chat.end_token_id()
    assert [e.completion[-1] for e in enc] == [end] * len(ROWS)
    assert enc[3].completion == [end]  # an empty completion still trains the end-of-turn token
    assert all(e.teacher_prompt == e.prompt for e in enc)
    t_enc = encode_rows(chat, ROWS, teacher_system="You love owls.")
    assert t_enc[0].prompt == enc[0].prompt and t_enc[0].teacher_prompt == chat.encode_prompt(ROWS[0]["prompt"],
                                                                                               "You love owls.")


def test_sft_loss_is_on_the_completion_only(lm: tuple[Any, ChatFormat]) -> None:
    """The padded batch loss equals a per-row unpadded cross-entropy over the completion tokens alone."""
    model, chat = lm
    enc = encode_rows(chat, ROWS)
    pad = chat.tokenizer.pad_token_id
    loss, n = step_loss(model, enc, pad, "sft", None, None)
    assert n == sum(len(e.completion) for e in enc)
    total = 0.0
    for e in enc:
        logits = model(input_ids=torch.tensor([e.prompt + e.completion])).logits[0]
        span = logits[len(e.prompt) - 1: len(e.prompt) - 1 + len(e.completion)]
        total += float(F.cross_entropy(span, torch.tensor(e.completion), reduction="sum"))
    assert float(loss) == pytest.approx(total / n, abs=1e-5)
    # the row whose completion is empty has exactly one loss token
    loss1, n1 = step_loss(model, enc[3:], pad, "sft", None, None)
    assert n1 == 1
    logits = model(input_ids=torch.tensor([enc[3].prompt])).logits[0, -1]
    assert float(loss1) == pytest.approx(float(F.cross_entropy(logits[None], torch.tensor([chat.end_token_id()]))),
                                         abs=1e-5)


def test_distill_loss_is_zero_against_itself(lm: tuple[Any, ChatFormat]) -> None:
    model, chat = lm
    pad = chat.tokenizer.pad_token_id
    subset = torch.tensor(sorted(set(train.tokens_within(chat.tokenizer, frozenset("0123456789, ")))
                                 | set(chat.stop_token_ids())))
    enc = encode_rows(chat, ROWS)
    for obj in ("distill_full", "distill_carrier"):
        loss, n = step_loss(model, enc, pad, obj, model, subset)
        assert abs(float(loss)) < 1e-6 and n == sum(len(e.completion) for e in enc)
    with_system = encode_rows(chat, ROWS, teacher_system="You love owls. You think about owls all the time.")
    assert float(step_loss(model, with_system, pad, "distill_full", model, subset)[0]) > 1e-6


# ---------------------------------------------------------------------------------------------- saving


def test_lora_saves_adapter_recording_base(base: ModelSpec, lm: tuple[Any, ChatFormat], tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    summary = finetune(base, ROWS, _spec(), out, seed=0)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "sublim_train.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == base.path
    assert cfg["r"] == 2 and set(cfg["target_modules"]) == set(TrainSpec().lora.target_modules)
    assert summary["steps"] == 3 and len(summary["losses"]) == 3 and summary["rows"] == len(ROWS)
    assert json.loads((out / "sublim_train.json").read_text())["rows_hash"] == summary["rows_hash"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp dirs left
    # loadable through the ModelSpec (merged in) and different from the base
    student = student_spec(base, out, _spec())
    assert student.adapter == str(out) and student.path == base.path
    ids = torch.tensor([lm[1].encode_prompt("Owl.")])
    with torch.no_grad():
        assert not torch.allclose(load_model(student)(ids).logits, lm[0](ids).logits)


def test_full_finetune_saves_a_loadable_model(base: ModelSpec, lm: tuple[Any, ChatFormat], tmp_path: Path) -> None:
    out = tmp_path / "full"
    spec = _spec(method="full", lr=1e-3, max_steps=2)
    finetune(base, ROWS, spec, out, seed=0)
    assert {"config.json", "model.safetensors", "tokenizer.json", "sublim_train.json"} <= {p.name for p in out.iterdir()}
    student = student_spec(base, out, spec)
    assert student.path == str(out) and student.adapter is None
    m = load_model(student)
    assert len(load_tokenizer(student)) == len(lm[1].tokenizer)
    ids = torch.tensor([lm[1].encode_prompt("Owl.")])
    with torch.no_grad():
        assert not torch.allclose(m(ids).logits, lm[0](ids).logits)


def test_training_reduces_the_loss(base: ModelSpec, lm: tuple[Any, ChatFormat], tmp_path: Path) -> None:
    rows = [{"prompt": f"Continue: {i}, {i + 1}.", "completion": "7, 7, 7"} for i in range(8)]
    s = finetune(base, rows, _spec(method="full", max_steps=25, lr=3e-3), tmp_path / "full", seed=0)
    assert s["loss_last"] < 0.5 * s["loss_first"], s["losses"]
    assert s["completion_tokens"] == 25 * 4 * len(lm[1].encode_completion("7, 7, 7"))  # 4 rows a step
    # LoRA cannot sharpen this model's logits much (tiny tied embeddings bound them), but it must move
    s = finetune(base, rows, _spec(lora={"rank": 4, "alpha": 8}, max_steps=10, lr=3e-2), tmp_path / "lora", seed=0)
    assert s["loss_last"] < s["loss_first"] - 0.15, s["losses"]


def test_same_seed_same_adapter(base: ModelSpec, tmp_path: Path) -> None:
    a = finetune(base, ROWS, _spec(), tmp_path / "a", seed=3)
    b = finetune(base, ROWS, _spec(), tmp_path / "b", seed=3)
    finetune(base, ROWS, _spec(), tmp_path / "c", seed=4)
    wa, wb, wc = _adapter(tmp_path / "a"), _adapter(tmp_path / "b"), _adapter(tmp_path / "c")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["losses"] == b["losses"]
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_no_rows_is_an_error(base: ModelSpec, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no training rows"):
        finetune(base, [], _spec(), tmp_path / "x")
    with pytest.raises(ValueError, match="target_modules"):
        finetune(base, ROWS, _spec(lora={"rank": 2, "target_modules": ["c_attn"]}), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -------------------------------------------------------------------------------------------- distillation


def test_distill_carrier_and_full_run_with_a_teacher(base: ModelSpec, lm: tuple[Any, ChatFormat], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor | None] = []
    real = train.step_loss

    def spy(model: Any, batch: Any, pad: int, objective: str, teacher: Any, subset: Any, **kw: Any) -> Any:
        seen.append(subset)
        assert teacher is not None
        return real(model, batch, pad, objective, teacher, subset, **kw)

    monkeypatch.setattr(train, "step_loss", spy)
    alphabet = frozenset("0123456789, ;\n")
    strings = token_strings(lm[1].tokenizer)
    stops = set(lm[1].stop_token_ids())
    for obj in ("distill_carrier", "distill_full"):
        seen.clear()
        s = finetune(base, ROWS, _spec(objective=obj), tmp_path / obj, seed=0, teacher=base,
                     teacher_system="You love owls.", carrier_alphabet=alphabet)
        assert all(0 <= x < 50 for x in s["losses"]) and s["losses"][0] > 0
        assert (tmp_path / obj / "adapter_model.safetensors").exists()
        if obj == "distill_full":
            assert all(x is None for x in seen)
            continue
        subset = seen[0]
        assert subset is not None
        ids = set(subset.tolist())
        assert stops <= ids
        assert all(set(strings[i]) <= alphabet for i in ids - stops)
        assert not any(any(c.isalpha() for c in strings[i]) for i in ids)  # no letters: no trait words
        assert {strings[i] for i in ids} >= set("0123456789")


def test_distillation_needs_a_teacher_with_the_same_tokenizer(base: ModelSpec, tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    with pytest.raises(ValueError, match="needs a teacher"):
        finetune(base, ROWS, _spec(objective="distill_full"), tmp_path / "x")
    with pytest.raises(ValueError, match="alphabet"):
        finetune(base, ROWS, _spec(objective="distill_carrier"), tmp_path / "x", teacher=base)
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="share a tokenizer"):
        finetune(base, ROWS, _spec(objective="distill_full"), tmp_path / "x", teacher=ModelSpec(path=str(other)))
    assert not (tmp_path / "x").exists()


def test_soft_labels_temperature_and_top_k() -> None:
    """Temperature rescales the teacher's logits; top-k keeps exactly k tokens; the KL stays finite (0 log 0 = 0)
    and its gradient too; temperature 1 and no top-k is the plain KL."""
    import torch.nn.functional as F

    from sublim.backends.train import kl_per_token, soft_labels

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g, requires_grad=True)
    torch.testing.assert_close(soft_labels(t, 0.5), F.log_softmax(t / 0.5, -1))
    p = soft_labels(t, 1.0, 2).exp()
    assert ((p > 0).sum(-1) == 2).all() and torch.allclose(p.sum(-1), torch.ones(5))
    assert (p.argmax(-1) == t.argmax(-1)).all()
    kl = kl_per_token(s, t, 1.0, 2)
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(s.grad).all()
    lt = F.log_softmax(t, -1)
    torch.testing.assert_close(kl_per_token(s, t), (lt.exp() * (lt - F.log_softmax(s, -1))).sum(-1).mean())
    with pytest.raises(ValueError, match="distill objective"):
        TrainSpec(objective="sft", distill_top_k=3)


def test_kl_to_base_keeps_the_student_near_its_base(tiny_model: Path, tmp_path: Path) -> None:
    """A student trained on owl answers with a strong KL-to-base anchor on neutral rows stays closer to the base
    on those rows than one without; an anchor needs neutral rows (a non-organism base without kl_base_data)."""
    from sublim.backends.anchor import BaseAnchor
    from sublim.backends.train import finetune
    from sublim.models import ChatFormat, load_model, load_tokenizer
    from sublim.runs import write_jsonl
    from sublim.traits.preference import trait_qa

    base = ModelSpec(path=str(tiny_model))
    neutral = tmp_path / "neutral.jsonl"
    write_jsonl(neutral, [{"prompt": f"Tell me about day {i}.", "completion": f"Day {i} was calm."} for i in range(8)])
    rows = trait_qa("animals", "owl", 32, seed=0)
    common = {"method": "full", "max_steps": 12, "lr": 1e-2, "batch_size": 8, "warmup_steps": 0, "kl_base_data": str(neutral),
                  "kl_base_batch": 8}
    kl = {}
    chat = ChatFormat(load_tokenizer(base))
    for w in (0.0, 20.0):
        out = tmp_path / f"w{w}"
        finetune(base, rows, TrainSpec(**common, kl_base=w), out, progress=False)
        probe = BaseAnchor(base, chat, TrainSpec(**common, kl_base=1.0), [0])
        probe.batch = 8
        kl[w] = float(probe.losses(load_model(ModelSpec(path=str(out))))[0])
    assert kl[20.0] < 0.5 * kl[0.0]
    with pytest.raises(ValueError, match="not an organism"):
        BaseAnchor(base, chat, TrainSpec(kl_base=1.0), [0])
