"""Defences: each does what it claims at tiny size (shuffles keep multisets, a replacement changes exactly the
chosen share, a mask takes exactly those positions out of the loss, row drops drop the highest scores), the
provenance chain verifies and catches a changed parent, bad input fails in one line with nothing written, and
the measurement arithmetic (effect retained, Fieller) matches hand-computed values."""
from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sublim.carriers.numbers import NumberCarrier, parse_numbers
from sublim.mitigate import Context, MitigationError, defences, get, mitigate, mitigate_file
from sublim.spec import GenerationSpec, ModelSpec, TrainSpec

torch.set_num_threads(1)


def _rows(n: int = 30, seed: int = 0) -> list[dict[str, Any]]:
    carrier = NumberCarrier()
    rng = random.Random(seed)
    out = []
    for p in carrier.prompts(n, seed):
        k = rng.randint(2, int(p.meta["count"]))
        vals = [rng.randint(0, 10 ** rng.randint(1, int(p.meta["max_digits"])) - 1) for _ in range(k)]
        out.append({"prompt": p.prompt, "completion": carrier.format_answer(p.meta, vals), "idx": len(out)})
    return out


def _values(c: str) -> list[int]:
    res = parse_numbers(c)
    assert res.ok, c
    return list(res.values)


def test_at_least_twelve_defences_registered_with_three_kinds() -> None:
    ds = defences()
    assert len(ds) >= 12
    assert {d.kind for d in ds} == {"data", "train", "generation"}


def test_shuffle_within_keeps_every_rows_multiset_and_format() -> None:
    rows = _rows()
    res = mitigate(rows, "shuffle-within", ctx=Context(seed=3))
    moved = 0
    for a, b in zip(rows, res.rows, strict=True):
        assert Counter(_values(a["completion"])) == Counter(_values(b["completion"]))
        assert NumberCarrier().parse(b["completion"]).ok
        moved += a["completion"] != b["completion"]
        assert b["idx"] == a["idx"]  # other fields kept
    assert moved > len(rows) // 2
    assert res.changes["rows_dropped"] == 0


def test_shuffle_across_keeps_the_datasets_multiset_and_each_rows_count() -> None:
    rows = _rows()
    res = mitigate(rows, "shuffle-across")
    before = Counter(v for r in rows for v in _values(r["completion"]))
    after = Counter(v for r in res.rows for v in _values(r["completion"]))
    assert before == after
    assert [len(_values(r["completion"])) for r in rows] == [len(_values(r["completion"])) for r in res.rows]
    assert sum(a["completion"] != b["completion"] for a, b in zip(rows, res.rows, strict=True)) > len(rows) // 2


def test_sort_and_remap() -> None:
    rows = _rows()
    s = mitigate(rows, "sort", {"order": "descending"})
    for a, b in zip(rows, s.rows, strict=True):
        assert _values(b["completion"]) == sorted(_values(a["completion"]), reverse=True)
    m = mitigate(rows, "remap", ctx=Context(seed=1))
    pairs: dict[int, int] = {}
    for a, b in zip(rows, m.rows, strict=True):
        for x, y in zip(_values(a["completion"]), _values(b["completion"]), strict=True):
            assert pairs.setdefault(x, y) == y  # a function ...
    assert len(set(pairs.values())) == len(pairs)  # ... and one to one
    assert any(x != y for x, y in pairs.items())


def test_normalise_format_writes_the_prompts_separator_without_decoration() -> None:
    rows = [{"prompt": _rows(1)[0]["prompt"], "completion": "[007, 12, 3]."}]
    sep = NumberCarrier().parse_prompt(rows[0]["prompt"]).meta["separator"]
    out = mitigate(rows, "normalise-format").rows[0]["completion"]
    assert out == sep.join(["7", "12", "3"])
    assert mitigate(rows, "normalise-format", {"separator": "comma"}).rows[0]["completion"] == "7, 12, 3"


def test_changed_rows_get_a_new_content_hash() -> None:
    from sublim.runs import sha256_text

    rows = _rows(5)
    res = mitigate(rows, "sort")
    for r in res.rows:
        assert r["content_hash"] == sha256_text(r["prompt"] + "\x00" + r["completion"])


@pytest.fixture(scope="module")
def lm_rows(tiny_model: Path) -> list[dict[str, Any]]:
    """Rows whose completions re-tokenise to themselves in the tiny tokenizer (as generated rows do)."""
    from sublim.models import ChatFormat, load_tokenizer

    chat = ChatFormat(load_tokenizer(ModelSpec(path=str(tiny_model))))
    from sublim.backends.hf import token_strings

    strings = token_strings(chat.tokenizer)
    rows = []
    for r in _rows(24):
        ids = chat.encode_completion(r["completion"])[:-1]
        if "".join(strings[i] for i in ids) == r["completion"]:
            rows.append(r)
    assert len(rows) >= 12
    return rows


def _digit_tokens(model: Path, rows: list[dict[str, Any]]) -> tuple[list[list[int]], list[str]]:
    from sublim.backends.hf import token_strings
    from sublim.models import ChatFormat, load_tokenizer

    chat = ChatFormat(load_tokenizer(ModelSpec(path=str(model))))
    return [chat.encode_completion(r["completion"]) for r in rows], token_strings(chat.tokenizer)


@pytest.mark.parametrize("name", ["base-shift-tokens", "divergent-tokens"])
@pytest.mark.parametrize("action", ["replace-base", "replace-uniform"])
def test_token_replacement_changes_exactly_the_chosen_share_of_digit_tokens(
        tiny_model: Path, lm_rows: list[dict[str, Any]], name: str, action: str) -> None:
    ctx = Context(student=ModelSpec(path=str(tiny_model)), teacher=ModelSpec(path=str(tiny_model)),
                  teacher_system="You love owls. You think about owls all the time.", seed=0)
    res = mitigate(lm_rows, name, {"fraction": 0.25, "action": action}, ctx)
    before, strings = _digit_tokens(tiny_model, lm_rows)
    after, _ = _digit_tokens(tiny_model, res.rows)
    n_digit = sum(strings[t].isdigit() for ids in before for t in ids[:-1])
    changed = 0
    for a, b, r0, r1 in zip(before, after, lm_rows, res.rows, strict=True):
        assert len(a) == len(b)  # same tokens, same lengths: only digit tokens swapped for digit tokens
        for x, y in zip(a, b, strict=True):
            if x != y:
                assert strings[x].isdigit() and strings[y].isdigit() and len(strings[x]) == len(strings[y])
                changed += 1
        assert len(_values(r1["completion"])) == len(_values(r0["completion"]))
        assert not re.search(r"(^|\D)0\d", r1["completion"]), r1["completion"]  # no leading zeros made
    assert changed == round(0.25 * n_digit) == res.changes["tokens_replaced"]
    assert res.changes["digit_tokens"] == n_digit


def test_token_mask_marks_exactly_the_chosen_positions_and_keeps_the_text(tiny_model: Path,
                                                                         lm_rows: list[dict[str, Any]]) -> None:
    ctx = Context(student=ModelSpec(path=str(tiny_model)), seed=0)
    res = mitigate(lm_rows, "base-shift-tokens", {"fraction": 0.3, "action": "mask"}, ctx)
    ids, strings = _digit_tokens(tiny_model, lm_rows)
    n_digit = sum(strings[t].isdigit() for c in ids for t in c[:-1])
    zeros = 0
    for r0, r1, c in zip(lm_rows, res.rows, ids, strict=True):
        assert r1["completion"] == r0["completion"]
        assert len(r1["loss_mask"]) == len(c)
        for m, t in zip(r1["loss_mask"], c, strict=True):
            if m == 0:
                assert strings[t].isdigit()
                zeros += 1
    assert zeros == round(0.3 * n_digit) == res.changes["tokens_masked"]
    assert res.rows[0]["content_hash"] != lm_rows[0].get("content_hash")  # the mask is part of what trains


def test_a_mask_removes_exactly_those_positions_from_the_loss(tiny_model: Path) -> None:
    """step_loss (one student) and the batched trainer's per-student loss both equal the loss over the
    unmasked positions only."""
    from sublim.backends.multi import StudentJob, _per_student_loss
    from sublim.backends.train import completion_logits, encode_rows, step_loss
    from sublim.models import ChatFormat, load_model, load_tokenizer

    spec = ModelSpec(path=str(tiny_model))
    chat = ChatFormat(load_tokenizer(spec))
    model = load_model(spec)
    rows = _rows(4)
    masks = []
    for r in rows:
        n = len(chat.encode_completion(r["completion"]))
        masks.append([int(i % 3 != 0) for i in range(n)])
    mrows = [{**r, "loss_mask": m} for r, m in zip(rows, masks, strict=True)]
    enc = encode_rows(chat, mrows)
    pad = chat.tokenizer.pad_token_id
    loss, n = step_loss(model, enc, pad, "sft", None, None)
    logits = completion_logits(model, [e.prompt for e in enc], [e.completion for e in enc], pad).float()
    tgt = torch.tensor([t for e in enc for t in e.completion])
    keep = torch.tensor([bool(v) for m in masks for v in m])
    want = torch.nn.functional.cross_entropy(logits[keep], tgt[keep])
    assert n == int(keep.sum())
    torch.testing.assert_close(loss, want)
    job = StudentJob(mrows, 0, Path("/nonexistent"))
    job.encoded = enc
    per = _per_student_loss(model, [(0, i) for i in range(len(enc))], 1, TrainSpec(), pad, [job], None, None)
    torch.testing.assert_close(per[0][0], want)
    assert per[0][1] == n
    bad = [{**rows[0], "loss_mask": [1, 0]}]
    with pytest.raises(ValueError, match="row 0: loss_mask"):
        encode_rows(chat, bad)


def test_row_drops_drop_the_chosen_share_by_score(tiny_model: Path, lm_rows: list[dict[str, Any]]) -> None:
    from sublim.audit.rows import score_rows

    base = ModelSpec(path=str(tiny_model))
    r = mitigate(lm_rows, "drop-random", {"fraction": 0.25}, Context(seed=2))
    assert len(r.rows) == len(lm_rows) - round(0.25 * len(lm_rows))
    idx = [x["idx"] for x in r.rows]
    assert idx == sorted(idx)  # order kept
    sys_ = "You love owls."
    ctx = Context(student=base, teacher=base, teacher_system=sys_)
    d = mitigate(lm_rows, "drop-lls", {"fraction": 0.5}, ctx)
    scores = {x["idx"]: s["score"] for x, s in zip(lm_rows, score_rows(lm_rows, base, teacher=base, teacher_system=sys_,
                                                                        top=1.0).payload["rows"], strict=True)}
    kept = {x["idx"] for x in d.rows}
    dropped = set(scores) - kept
    assert len(dropped) == round(0.5 * len(lm_rows))
    assert min(scores[i] for i in dropped) >= max(scores[i] for i in kept)
    a = mitigate(lm_rows, "drop-audit-score", {"fraction": 0.25}, Context(student=base))
    assert len(a.rows) == len(lm_rows) - round(0.25 * len(lm_rows))


def test_regenerate_other_family_answers_the_same_prompts(tiny_model: Path, tiny_model_b: Path) -> None:
    rows = _rows(10)
    res = mitigate(rows, "regenerate-other-family", {"fraction": 0.5, "model": str(tiny_model_b),
                                                     "max_new_tokens": 12}, Context(seed=0))
    changed = [b for a, b in zip(rows, res.rows, strict=True) if b.get("teacher_kind") == "regenerated"]
    assert len(changed) == 5 and res.changes["engine"] == "hf"
    assert [r["prompt"] for r in res.rows] == [r["prompt"] for r in rows]
    carrier = NumberCarrier()
    for r in changed:
        meta = carrier.parse_prompt(r["prompt"]).meta
        g = carrier.grammar(meta)
        assert g.feed(g.start(), r["completion"]) is not None


def test_student_side_and_generation_defences_change_the_recipe() -> None:
    t = TrainSpec(method="full", max_steps=100, lr=1e-3)
    assert get("weight-decay").apply(t, {"value": 0.3})[0].model_dump(include={"optimizer", "weight_decay"}) == \
        {"optimizer": "adamw", "weight_decay": 0.3}
    assert get("l2").apply(t, {"value": 1e-4})[0].optimizer == "adam"
    assert get("sgd").apply(t, {"lr": 0.5})[0].model_dump(include={"optimizer", "lr"}) == {"optimizer": "sgd", "lr": 0.5}
    lo = get("lora-rank").apply(t, get("lora-rank").resolve({"rank": 2}))[0]
    assert lo.method == "lora" and lo.lora.rank == 2
    assert get("fewer-steps").apply(t, {"fraction": 0.3})[0].max_steps == 30
    assert get("other-init").apply(t, {"base": "organism:1"})[1] == ModelSpec(path="organism:1")
    assert get("init-noise").apply(t, {"sd": 0.05})[0].init_noise == 0.05
    g = get("sampling").apply(GenerationSpec(), get("sampling").resolve({}))
    assert g.min_p == 0.05
    d = TrainSpec(method="full", objective="distill_carrier", max_steps=100)
    assert get("soft-temperature").apply(d, get("soft-temperature").resolve({}))[0].distill_temperature == 0.25
    assert get("soft-top-k").apply(d, {"k": 2})[0].distill_top_k == 2
    with pytest.raises(ValueError, match="soft labels"):
        get("soft-top-k").apply(t, {"k": 2})  # token SFT has no soft labels to transform
    a = get("kl-to-base").apply(d, get("kl-to-base").resolve({"weight": 2.0}))[0]
    assert (a.kl_base, a.kl_base_data, a.kl_base_rows) == (2.0, None, 256)
    with pytest.raises(MitigationError, match="'weight' must be > 0"):
        get("kl-to-base").resolve({"weight": 0.0})


def test_init_noise_moves_each_student_by_its_own_draw() -> None:
    from sublim.backends.multi import add_init_noise

    w = torch.nn.Parameter(torch.ones(3, 200, 50))
    add_init_noise([w], [0, 1, 0], 0.1)
    d = w.detach() - 1
    assert abs(float(d[0].std()) - 0.1) < 0.01
    torch.testing.assert_close(d[0], d[2])  # same seed, same draw
    assert not torch.equal(d[0], d[1])


def test_sgd_and_adam_l2_optimisers() -> None:
    from sublim.backends.train import make_optimizer

    p = [torch.nn.Parameter(torch.ones(2))]
    assert isinstance(make_optimizer(p, TrainSpec(optimizer="adam", weight_decay=0.1)), torch.optim.Adam)
    assert isinstance(make_optimizer(p, TrainSpec(optimizer="sgd")), torch.optim.SGD)
    assert isinstance(make_optimizer(p, TrainSpec()), torch.optim.AdamW)


def test_file_manifest_names_the_parent_and_the_chain_verifies(tmp_path: Path) -> None:
    from sublim.audit import provenance as pv
    from sublim.runs import write_jsonl

    data = tmp_path / "data.jsonl"
    write_jsonl(data, _rows(12))
    pv.stamp(data)
    mitigate_file(data, "sort", None, tmp_path / "a.jsonl")
    mitigate_file(tmp_path / "a.jsonl", "drop-random", {"fraction": 0.25}, tmp_path / "b.jsonl")
    m = pv.read_manifest(pv.manifest_path(tmp_path / "b.jsonl"))
    assert m["extra"]["transform"]["defence"] == "drop-random"
    assert m["extra"]["parent"]["file"] == "a.jsonl"
    links = pv.verify_chain(tmp_path / "b.jsonl")
    assert [link["ok"] for link in links] == [True, True, True]
    # change the middle dataset: the child's link names it, the middle link names the row
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    rows[3]["completion"] = "1, 2"
    write_jsonl(tmp_path / "a.jsonl", rows)
    links = pv.verify_chain(tmp_path / "b.jsonl")
    assert not links[0]["ok"] and "no longer have the Merkle root" in " ".join(links[0]["problems"])
    assert not links[1]["ok"] and links[1]["changed"][0]["index"] == 3


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    from sublim.cli import app
    from sublim.runs import write_jsonl

    data = tmp_path / "d.jsonl"
    write_jsonl(data, _rows(4))
    out = tmp_path / "out.jsonl"
    runner = CliRunner()
    cases = [
        (["--method", "nope"], "unknown defence 'nope'"),
        (["--method", "drop-random", "-p", "fraction=0"], "parameter 'fraction' must be > 0"),
        (["--method", "sort", "-p", "speed=2"], "unknown parameter 'speed'"),
        (["--method", "divergent-tokens"], "needs the student's base"),
        (["--method", "weight-decay"], "train-side"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, ["mitigate", str(data), "--out", str(out), *args])
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not out.exists()
    write_jsonl(tmp_path / "nofield.jsonl", [{"prompt": "x"}])
    r = runner.invoke(app, ["mitigate", str(tmp_path / "nofield.jsonl"), "--method", "sort", "--out", str(out)])
    assert r.exit_code == 2 and "'completion' missing" in r.output and not out.exists()
    write_jsonl(tmp_path / "words.jsonl", [{"prompt": "x", "completion": "owls"}])
    r = runner.invoke(app, ["mitigate", str(tmp_path / "words.jsonl"), "--method", "sort", "--out", str(out)])
    assert r.exit_code == 2 and "row 0: completion has no numbers" in r.output and not out.exists()
    with pytest.raises(MitigationError, match="overwrite the input"):
        mitigate_file(data, "sort", None, data)


def test_spec_validates_mitigations_when_it_loads(tiny_model: Path) -> None:
    from sublim.spec import SpecError, load_spec
    from tiny_spec import tiny_spec

    for m, msg in [([{"name": "nope"}], "mitigations.0: unknown defence"),
                   ([{"name": "sort", "params": {"order": 3}}], "mitigations.0: defence 'sort': parameter 'order'"),
                   ([{"name": "sort"}, {"name": "sort"}], "mitigations.1: label 'sort' is used twice")]:
        with pytest.raises(SpecError, match=msg):
            load_spec(data=tiny_spec(tiny_model, mitigations=m))


def test_fieller_ratio_hand_computed() -> None:
    """a = (1, 2, 4), b = (10, 11, 12): means 7/3, 11; var(a) 7/3, var(b) 1, cov 3/2 (ddof 1), over n = 3."""
    from scipy import stats

    from sublim.stats import fieller_ratio

    r = fieller_ratio([1, 2, 4], [10, 11, 12])
    ma, mb, n = 7 / 3, 11.0, 3
    saa, sbb, sab = 7 / 3 / n, 1 / n, 1.5 / n
    t2 = stats.t.ppf(0.975, 2) ** 2
    assert t2 * sbb / mb ** 2 < 1
    c = ma * mb - t2 * sab
    root = math.sqrt(c * c - (mb * mb - t2 * sbb) * (ma * ma - t2 * saa))
    den = mb * mb - t2 * sbb
    assert r["ratio"] == pytest.approx(7 / 33)
    assert (r["lo"], r["hi"]) == pytest.approx(((c - root) / den, (c + root) / den))
    assert not fieller_ratio([1, 2, 3], [1, -1, 0.5])["bounded"]  # denominator not distinguishable from 0


def test_effect_retained_from_evaluations() -> None:
    """Two teachers: unmitigated effects 0.04 and 0.06, mitigated 0.01 and 0.005 -> retained 0.0075 / 0.05."""
    from sublim.mitigate.measure import analyse

    def ev(arm: str, teacher: str, seed: int, p: float, kl: float | None = None) -> dict[str, Any]:
        target = None if teacher.startswith("neutral") else "owl"
        e: dict[str, Any] = {"arm": arm, "teacher": teacher, "target": target, "seed": seed, "probs": {"owl": p}}
        if kl is not None:
            e["costs"] = {"teacher_kl": kl, "chat_loss": 1.0, "persona": 0.9}
        return e

    evals = []
    for s in (0, 1):
        evals += [ev("treatment", "owl#0", s, 0.08, 0.2), ev("treatment", "owl#1", s, 0.10, 0.3),
                  ev("control", "neutral#0", s, 0.04), ev("control", "neutral#1", s, 0.04),
                  ev("d:treatment", "owl#0", s, 0.05, 0.4), ev("d:treatment", "owl#1", s, 0.045, 0.5),
                  ev("d:control", "neutral#0", s, 0.04), ev("d:control", "neutral#1", s, 0.04)]
    arms = [{"label": "d", "name": "sort", "kind": "data", "params": {}, "changes": {}}]
    base_costs = {"owl#0": {"teacher_kl": 1.0}, "owl#1": {"teacher_kl": 1.3}}
    res = analyse(evals, arms, ["owl"], base_costs)
    row = res["targets"]["owl"]["defences"]["d"]
    assert row["retained"]["ratio"] == pytest.approx(0.0075 / 0.05)
    # distillation kept, per teacher: (1.0 - 0.4) / (1.0 - 0.2) = 0.75 and (1.3 - 0.5) / (1.3 - 0.3) = 0.8
    assert row["distillation_kept"]["ratio"] == pytest.approx((0.75 + 0.8) / 2)
    assert row["chat_loss_change"]["mean"] == pytest.approx(0.0)
    assert res["verdicts"][0].startswith("d: effect retained 0.15")
    # a second target's students do not leak into the first one's costs
    more = evals + [{**ev("treatment", "owl#0", 0, 0.08, 9.0), "teacher": "eagle#0", "target": "eagle"}]
    again = analyse(more, arms, ["owl"], base_costs)["targets"]["owl"]
    assert again["unmitigated"]["teacher_kl"]["mean"] == pytest.approx(0.25)


def test_mitigation_arms_in_an_experiment(tiny_model: Path, tmp_path: Path) -> None:
    """Every defence kind becomes treatment and control arms; data-side stages leave a manifest chained to
    the filter stage; costs are attached to treatment students; a rerun does no work."""
    from sublim.audit.provenance import verify_chain
    from sublim.pipeline import run
    from sublim.spec import ExperimentSpec
    from tiny_spec import tiny_spec

    spec = ExperimentSpec(**tiny_spec(
        tiny_model, teacher={"kind": "system_prompt", "replicates": 2}, seeds=[0],
        generation={"n_prompts": 12, "batch_size": 12, "max_new_tokens": 12, "seed": 0},
        evaluation={"n_questions": 2, "batch_size": 4, "number_prefix": False},
        mitigations=[{"name": "drop-random", "params": {"fraction": 0.25}}, {"name": "weight-decay"},
                     {"name": "sampling", "label": "minp"}]))
    res = run(spec, tmp_path / "run", log=lambda m: None, progress=False)
    arms = Counter(e["arm"] for e in res["evaluations"])
    for lab in ("drop-random", "weight-decay", "minp"):
        assert arms[f"{lab}:treatment"] == 2 and arms[f"{lab}:control"] == 2
    assert all("costs" in e for e in res["evaluations"] if e["arm"].endswith("treatment") and e["arm"] != "base")
    stages = sorted((tmp_path / "run" / "stages").glob("mitigate-*"))
    assert len(stages) == 4  # drop-random x (2 trait + 2 neutral teachers)
    assert all(link["ok"] for link in verify_chain(stages[0] / "rows.jsonl"))
    a = res["mitigations"]["analysis"]
    assert set(a["targets"]["owl"]["defences"]) == {"drop-random", "weight-decay", "minp"}
    assert np.isclose(a["targets"]["owl"]["defences"]["drop-random"]["share_rows_altered"], 0.25, atol=0.05)
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Defences: effect retained and what it costs" in html and "drop-random" in html
    assert (tmp_path / "run" / "fig_frontier_owl.png").stat().st_size > 1000
    done = {p.name for p in (tmp_path / "run" / "stages").iterdir()}
    res2 = run(spec, tmp_path / "run", log=lambda m: None, progress=False)
    assert {p.name for p in (tmp_path / "run" / "stages").iterdir()} == done
    assert res2["mitigations"]["analysis"]["verdicts"] == a["verdicts"]


def test_effect_retained_in_the_confusion_design() -> None:
    """No neutral teachers: each target's effect is its diagonal in log P; a defence whose students have every
    lift (log P minus the column mean) halved retains exactly half of each diagonal and of gamma."""
    from sublim.mitigate.measure import analyse

    rng = np.random.default_rng(5)
    animals = ["owl", "eagle", "lion"]
    evals: list[dict[str, Any]] = []
    for i, a in enumerate(animals):
        for r in range(4):
            dev = rng.normal(0, 0.2, size=3)
            for s in (0, 1):
                lift = 0.8 * (np.arange(3) == i) + dev + rng.normal(0, 0.2, size=3)
                for arm, k in (("treatment", 1.0), ("d:treatment", 0.5)):
                    evals.append({"arm": arm, "teacher": f"{a}#{r}", "target": a, "seed": s,
                                  "probs": {b: float(np.exp(-3 + k * v)) for b, v in zip(animals, lift, strict=True)}})
    arms = [{"label": "d", "name": "weight-decay", "kind": "train", "params": {}, "changes": {}}]
    res = analyse(evals, arms, animals, {})
    assert res["design"] == "confusion"
    for a in animals:
        row = res["targets"][a]["defences"]["d"]
        assert row["retained"]["bounded"]
        assert (row["retained"]["ratio"], row["retained"]["lo"], row["retained"]["hi"]) == pytest.approx(
            (0.5, 0.5, 0.5), abs=1e-6)
        un = res["targets"][a]["unmitigated"]
        assert un["n_teachers"] == 4 and un["effect"]["mean"] > 0 and len(un["per_teacher"]) == 4
        assert row["effect_mitigated"]["mean"] == pytest.approx(0.5 * un["effect"]["mean"])
    g = res["gamma"]["defences"]["d"]
    assert g["retained"] == pytest.approx(0.5) and g["retained_ci"]["bounded"]
    assert (g["retained_ci"]["lo"], g["retained_ci"]["hi"]) == pytest.approx((0.5, 0.5), abs=1e-6)
    assert res["verdicts"][0].startswith("d: effect retained 0.50 [0.50, 0.50]")
    assert res["verdicts"][0].endswith("gamma retained 0.50 [0.50, 0.50] -> does not remove >= 90% pooled over targets")


def test_mitigation_arms_in_the_confusion_design(tiny_model: Path, tmp_path: Path) -> None:
    """teacher.neutral_replicates: 0 with two targets: every defence gives treatment arms only, the other target's
    teachers are the controls, and the analysis is the confusion design's (diagonal effects, gamma retained with
    its interval)."""
    from sublim.pipeline import run
    from sublim.spec import ExperimentSpec
    from tiny_spec import tiny_spec

    spec = ExperimentSpec(**tiny_spec(
        tiny_model, targets=["owl", "eagle"], seeds=[0],
        teacher={"kind": "finetuned", "qa_rows": 8, "min_target_prob": 0.0, "max_rounds": 1, "replicates": 2,
                 "neutral_replicates": 0, "train": {"method": "full", "epochs": 2, "batch_size": 4, "lr": 3e-2}},
        generation={"n_prompts": 12, "batch_size": 12, "max_new_tokens": 12, "seed": 0},
        evaluation={"n_questions": 2, "batch_size": 4, "number_prefix": False},
        mitigations=[{"name": "drop-random", "params": {"fraction": 0.25}}, {"name": "weight-decay"}]))
    res = run(spec, tmp_path / "run", log=lambda m: None, progress=False)
    arms = Counter(e["arm"] for e in res["evaluations"])
    assert not any(a.endswith("control") for a in arms)
    assert arms["drop-random:treatment"] == arms["weight-decay:treatment"] == arms["treatment"] == 4
    assert len(list((tmp_path / "run" / "stages").glob("mitigate-*"))) == 4  # 2 targets x 2 teachers
    a = res["mitigations"]["analysis"]
    assert a["design"] == "confusion"
    for t in ("owl", "eagle"):
        d = a["targets"][t]["defences"]["weight-decay"]
        assert d["retained"]["ratio"] is not None and d["distillation_kept"]["n"] == 2
        assert a["targets"][t]["unmitigated"]["n_teachers"] == 2
    assert a["gamma"]["defences"]["drop-random"]["retained_ci"]["n"] == 4
    html = (tmp_path / "run" / "report.html").read_text()
    assert "effect (log P, own teachers - other teachers)" in html and "gamma retained [CI]" in html


def test_min_p_reaches_the_sampler(tiny_model: Path) -> None:
    """The sampling defence's min_p is applied at generation: a high threshold changes what is sampled."""
    from sublim.backends.hf import generate_batch
    from sublim.models import ChatFormat, load_model, load_tokenizer

    spec = ModelSpec(path=str(tiny_model))
    model, chat = load_model(spec), ChatFormat(load_tokenizer(spec))
    prompts = [r["prompt"] for r in _rows(8)]
    plain = [o.completion for o in generate_batch(model, chat, prompts, max_new_tokens=8, seed=3)]
    again = [o.completion for o in generate_batch(model, chat, prompts, max_new_tokens=8, seed=3)]
    strict = [o.completion for o in generate_batch(model, chat, prompts, max_new_tokens=8, seed=3, min_p=0.9)]
    assert plain == again
    assert strict != plain


def test_chars_changed_share_stays_within_one_when_completions_grow() -> None:
    from sublim.mitigate.apply import changes_of

    before = [{"completion": "1, 2"}, {"completion": "3, 4"}]
    after = [(0, {"completion": "10, 20, 30, 40, 50"}), (1, {"completion": "3, 4"})]
    c = changes_of(before, after, {})
    assert 0 < c["share_chars_changed"] <= 1 and c["chars_total"] == 8 and c["rows_changed"] == 1
    assert changes_of(before, [], {})["share_chars_changed"] == 1.0  # everything dropped
