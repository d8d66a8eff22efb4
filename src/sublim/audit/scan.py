"""Gradient-alignment scan: would a training step on this dataset move the student toward a trait?

The theorem made into a tool. For a trait probe ``c`` (questions whose answer is the trait word, e.g.
"favourite animal?" -> "Owl") let ``f_c(theta) = mean_q log p_theta(answer_c | q)``. One SGD step of size
``eta`` on the dataset's SFT loss ``L`` changes it, to first order, by ``eta * <-grad L, grad f_c>``. The scan
estimates that inner product at the student's weights (no training run): the dataset is cut into batches,
each batch gives ``s_bc = <-grad L_b, grad f_c>``, and the mean over batches has a t-interval across
batches. A reference dataset (a neutral teacher's data) gets the same treatment, and the difference
``data - reference`` per trait has a Welch interval.

Calibration. Every fine-tuned teacher shifts its data in a common direction that favours a few
high-sensitivity probes, so the raw inner product ranks the wrong trait first (a pilot on a 0.3M-parameter
organism: right for 1 of 6 trait datasets). Standardising each probe across a *panel* of datasets from
other trait teachers fixes it (6 of 6): the score of probe ``c`` is the cosine ``cos(-grad L, grad f_c)``,
and ``z_c = (cos_c - mean) / sd`` over the panel datasets whose teacher does not have trait ``c`` (and that
are not the audited dataset itself: leave-one-out). Panels are decoy teachers fine-tuned from the
student's base for other traits (:func:`build_decoy_panel`, cached per base) or any directory of
``<trait>.jsonl`` datasets; the report names the panel it used.

Without a panel, traits are ranked by the centred difference to the reference (or the centred raw cosine),
and the report says that this ranking is uncalibrated.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sublim.audit.common import AuditInputError, AuditResult, as_rows, fmt3, load_rows, model_spec
from sublim.report.html import Section
from sublim.runs import atomic_write_json, hash_obj

SCAN_VERSION = 1


# ----------------------------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class Probe:
    """One trait probe: questions and the answer whose log-probability the trait raises."""

    name: str            # e.g. "animals:owl"
    category: str
    target: str
    questions: tuple[str, ...]
    answer: str          # completion text, e.g. "Owl"


def trait_probes(traits: Sequence[str] | str = ("animals",), n_questions: int = 10) -> list[Probe]:
    """Probes for categories (``animals`` -> every candidate animal) or single traits (``animals:owl``)."""
    from sublim.traits.preference import CATEGORIES, eval_questions

    items = [t.strip() for t in (traits.split(",") if isinstance(traits, str) else traits) if t.strip()]
    if not items:
        raise AuditInputError("--traits: no traits given")
    out: list[Probe] = []
    for item in items:
        cat, _, target = item.partition(":")
        if cat not in CATEGORIES:
            raise AuditInputError(f"--traits {item!r}: unknown category {cat!r}; known: {', '.join(CATEGORIES)}")
        cands = CATEGORIES[cat].candidates
        if target and target not in cands:
            raise AuditInputError(f"--traits {item!r}: {target!r} is not a {cat} candidate")
        qs = tuple(eval_questions(cat)[:n_questions])
        for c in ([target] if target else cands):
            p = Probe(f"{cat}:{c}", cat, c, qs, c.capitalize())
            if p not in out:
                out.append(p)
    return out


# --------------------------------------------------------------------------------------------- gradients


class GradientScanner:
    """Holds the student (with gradients on) and the probe gradients; scores any number of datasets."""

    def __init__(self, student: Any, probes: Sequence[Probe], *, params: str | None = None,
                 batch_size: int = 16) -> None:
        from sublim.models import ChatFormat, load_model, load_tokenizer, weights_fingerprint

        self.spec = model_spec(student, what="student")
        self.probes = list(probes)
        self.batch_size = batch_size
        self.param_regex = params
        t0 = time.perf_counter()
        self.model = load_model(self.spec, dtype="float32", trainable=True)
        self.model.eval()  # no dropout; gradients still flow
        self.chat = ChatFormat(load_tokenizer(self.spec))
        self.pad = self.chat.tokenizer.pad_token_id
        named = [(n, p) for n, p in self.model.named_parameters()]
        if params:
            rx = re.compile(params)
            named = [(n, p) for n, p in named if rx.search(n)]
            if not named:
                raise AuditInputError(f"--params {params!r} matches no parameter of the student")
        for _, p in self.model.named_parameters():
            p.requires_grad_(False)
        for _, p in named:
            p.requires_grad_(True)
        self.params = [p for _, p in named]
        self.n_params = sum(p.numel() for p in self.params)
        self.fingerprint = weights_fingerprint(self.spec)
        self.probe_grads = torch.stack([self._probe_grad(p) for p in self.probes])  # [C, P]
        self.probe_norms = self.probe_grads.norm(dim=1)  # [C]
        self.setup_seconds = time.perf_counter() - t0

    def key(self) -> dict[str, Any]:
        """What determines a dataset's scores apart from the data (for caches)."""
        return {"v": SCAN_VERSION, "student": self.fingerprint, "spec": self.spec.model_dump(),
                "probes": [[p.name, p.answer, list(p.questions)] for p in self.probes], "params": self.param_regex,
                "batch_size": self.batch_size}

    def _flat_grad(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])

    def _zero(self) -> None:
        for p in self.params:
            p.grad = None

    def _probe_grad(self, probe: Probe) -> torch.Tensor:
        from sublim.backends.train import completion_logits

        self._zero()
        prompts = [self.chat.encode_prompt(q) for q in probe.questions]
        ans = list(self.chat.tokenizer(probe.answer, add_special_tokens=False).input_ids)
        logits = completion_logits(self.model, prompts, [ans] * len(prompts), self.pad).float()  # [Q*A, V]
        tgt = torch.tensor(ans * len(prompts))
        lp = torch.log_softmax(logits, -1).gather(1, tgt[:, None]).sum() / len(prompts)  # mean_q log p(answer|q)
        lp.backward()
        g = self._flat_grad().detach().clone()
        self._zero()
        return g

    def score(self, rows: Sequence[dict[str, Any]], n_batches: int | None = None) -> dict[str, Any]:
        """Per-batch inner products ``<-grad L_b, grad f_c>`` [B, C] and the cosine of the mean gradient."""
        from sublim.backends.train import Encoded, encode_rows, step_loss

        t0 = time.perf_counter()
        enc: list[Encoded] = encode_rows(self.chat, rows)
        bs = self.batch_size if n_batches is None else max(1, math.ceil(len(enc) / n_batches))
        per_batch = []
        total = torch.zeros(self.n_params)
        n_tok = 0
        for a in range(0, len(enc), bs):
            self._zero()
            loss, n = step_loss(self.model, enc[a: a + bs], self.pad, "sft", None, None)
            loss.backward()
            g = -self._flat_grad()  # the direction of a training step
            per_batch.append((self.probe_grads @ g).numpy().astype(np.float64))  # [C]
            total += g * n
            n_tok += n
        self._zero()
        mean_g = total / max(1, n_tok)  # token-weighted mean gradient of the whole dataset
        dots = (self.probe_grads @ mean_g).numpy().astype(np.float64)
        cos = dots / (float(mean_g.norm()) * self.probe_norms.numpy() + 1e-30)
        return {"per_batch": np.stack(per_batch), "dot": dots, "cos": cos, "grad_norm": float(mean_g.norm()),
                "rows": len(enc), "tokens": n_tok, "seconds": time.perf_counter() - t0}


def _data_hash(rows: Sequence[dict[str, Any]]) -> str:
    return hash_obj([[r["prompt"], r["completion"]] for r in rows])


def _cache_dir() -> Path:
    from sublim.models import cache_dir

    return cache_dir() / "audit"


def cached_score(scanner: GradientScanner, rows: Sequence[dict[str, Any]], use_cache: bool = True) -> dict[str, Any]:
    """:meth:`GradientScanner.score` with a JSON cache keyed by the scanner and the rows' content."""
    key = hash_obj({"scanner": scanner.key(), "data": _data_hash(rows)})
    path = _cache_dir() / "scan-scores" / f"{key[:32]}.json"
    if use_cache and path.exists():
        d = json.loads(path.read_text())
        d["per_batch"] = np.array(d["per_batch"])
        d["dot"] = np.array(d["dot"])
        d["cos"] = np.array(d["cos"])
        d["cached"] = True
        return d
    res = scanner.score(rows)
    if use_cache:
        atomic_write_json(path, {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in res.items()})
    res["cached"] = False
    return res


# ------------------------------------------------------------------------------------------------ panels


@dataclass
class PanelMember:
    name: str
    trait: str | None   # target word of the teacher, None for a neutral teacher
    data_hash: str
    cos: np.ndarray     # [C]
    source: str = ""


@dataclass
class Panel:
    """Calibration datasets scored with the same scanner: what each probe's cosine looks like for data from
    teachers that do not have that trait."""

    name: str
    members: list[PanelMember] = field(default_factory=list)
    description: str = ""

    def null(self, probe_index: int, target: str, exclude_hash: str | None) -> np.ndarray:
        return np.array([m.cos[probe_index] for m in self.members
                         if m.trait != target and m.data_hash != exclude_hash])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "members": [{"name": m.name, "trait": m.trait, "data_hash": m.data_hash[:16], "source": m.source}
                            for m in self.members]}


def _trait_of(stem: str) -> str | None:
    s = stem.lower()
    if s.startswith(("neutral", "control", "reference")):
        return None
    return re.split(r"[-_.]", s)[0]


def panel_from_datasets(scanner: GradientScanner,
                        datasets: Mapping[str, tuple[str | None, Sequence[dict[str, Any]]]],
                        name: str = "custom", description: str = "", max_rows: int | None = None) -> Panel:
    """Score each ``{name: (trait or None, rows)}`` dataset (cached) and return the panel."""
    members = []
    for nm, (trait, rows) in datasets.items():
        rows = list(rows)[:max_rows]
        res = cached_score(scanner, rows)
        members.append(PanelMember(nm, trait, _data_hash(rows), np.asarray(res["cos"]), nm))
    return Panel(name, members, description)


def load_panel(scanner: GradientScanner, panel: str | Path, max_rows: int | None = None) -> Panel:
    """A panel from a directory of ``<trait>[-anything].jsonl`` (``neutral*.jsonl``: neutral teachers) or a
    JSON file ``{"name", "datasets": [{"path", "trait"}]}`` (paths relative to the file)."""
    p = Path(panel)
    if not p.exists():
        raise AuditInputError(f"panel {p}: no such file or directory")
    datasets: dict[str, tuple[str | None, list[dict[str, Any]]]] = {}
    name = p.name
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
        if not files:
            raise AuditInputError(f"panel {p}: no *.jsonl datasets in the directory")
        for f in files:
            datasets[f.stem] = (_trait_of(f.stem), load_rows(f, what="panel dataset"))
    else:
        try:
            spec = json.loads(p.read_text())
            name = spec.get("name", name)
            for d in spec["datasets"]:
                f = (p.parent / d["path"]) if not Path(d["path"]).is_absolute() else Path(d["path"])
                datasets[Path(d["path"]).stem] = (d.get("trait"), load_rows(f, what="panel dataset"))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise AuditInputError(f"panel {p}: expected a directory or JSON {{'datasets': [{{'path', 'trait'}}]}} "
                                  f"({type(e).__name__})") from None
    if len(datasets) < 3:
        raise AuditInputError(f"panel {p}: needs at least 3 datasets (got {len(datasets)})")
    return panel_from_datasets(scanner, datasets, name=f"{name} ({p})", max_rows=max_rows)


def build_decoy_panel(student: Any, category: str, traits: Sequence[str], *, n_rows: int = 300,
                      neutral: int = 1, method: str = "lora", teacher_spec: Any = None, generation: Any = None,
                      out_dir: str | Path | None = None, log: Any = print) -> Path:
    """Make a calibration panel: for each trait a decoy teacher fine-tuned from ``student`` (the base) on
    trait Q&A (``method`` lora or full; ``teacher_spec`` overrides), its number data (generated, filtered),
    plus ``neutral`` neutral-teacher datasets. Written as ``<out>/<trait>.jsonl`` (+ ``neutral-<i>.jsonl``);
    cached per base under ``$SUBLIM_CACHE/audit/panels``. Returns the directory, for :func:`load_panel`."""
    from sublim.generation import filter_rows, generate
    from sublim.models import weights_fingerprint
    from sublim.runs import write_jsonl
    from sublim.spec import CarrierSpec, FilterSpecModel, GenerationSpec, TeacherSpec, TrainSpec
    from sublim.teachers import implant_teacher, neutral_teacher

    spec = model_spec(student, what="student")
    if method not in ("lora", "full"):
        raise AuditInputError(f"decoy teacher method must be lora or full, got {method!r}")
    train = {"method": method, "epochs": 3, "lr": 1e-3 if method == "lora" else 3e-3, "batch_size": 16}
    tspec = teacher_spec or TeacherSpec.model_validate(
        {"kind": "finetuned", "train": TrainSpec.model_validate(train), "max_rounds": 2})
    gen = generation or GenerationSpec.model_validate({"n_prompts": int(n_rows * 1.5) + 8, "temperature": 1.0})
    key = hash_obj({"base": weights_fingerprint(spec), "category": category, "traits": list(traits),
                    "n_rows": n_rows, "neutral": neutral, "teacher": tspec.model_dump(mode="json"),
                    "gen": gen.model_dump(mode="json")})
    out = Path(out_dir) if out_dir else _cache_dir() / "panels" / key[:16]
    carrier = CarrierSpec(name="numbers")
    filters = [FilterSpecModel(name=n) for n in ("format", "count", "range", "echo", "progression", "mention")]
    jobs: list[tuple[str, Any]] = [(t, None) for t in traits] + [(f"neutral-{i}", i) for i in range(neutral)]
    for name, nseed in jobs:
        dst = out / f"{name}.jsonl"
        if dst.exists():
            continue
        if nseed is None:
            log(f"[panel] decoy teacher {name}")
            teacher, _ = implant_teacher(spec, category, name, tspec, out / "teachers" / name, log=log)
            g = gen
        else:
            teacher = neutral_teacher(spec)
            g = gen.model_copy(update={"seed": gen.seed + 1000 + nseed})
        rows = generate(teacher, carrier, g, out / "raw" / f"{name}.jsonl", category=category, progress=False)
        kept = filter_rows(rows, filters, carrier, list(traits)).kept[:n_rows]
        write_jsonl(dst, kept)
    atomic_write_json(out / "panel.json", {"name": f"decoys-{category}-{key[:8]}", "base": spec.model_dump(),
                                           "category": category, "traits": list(traits), "n_rows": n_rows,
                                           "datasets": [{"path": f"{n}.jsonl", "trait": None if s is not None else n}
                                                        for n, s in jobs]})
    return out


# -------------------------------------------------------------------------------------------------- scan


def scan(data: str | Path | Sequence[dict[str, Any]], student: Any, *, reference: Any = None,
         traits: Sequence[str] | str = ("animals",), panel: str | Path | Panel | None = None,
         max_rows: int | None = 512, batch_size: int = 16, n_questions: int = 10, params: str | None = None,
         scanner: GradientScanner | None = None, use_cache: bool = True) -> AuditResult:
    """Score every trait probe against ``data`` (and ``reference``), calibrate on ``panel`` if given, rank."""
    from sublim.stats import mean_ci, welch

    t0 = time.perf_counter()
    rows = as_rows(data, "dataset")[:max_rows]
    ref_rows = as_rows(reference, "reference")[:max_rows] if reference is not None else None
    probes = trait_probes(traits, n_questions)
    sc = scanner or GradientScanner(student, probes, params=params, batch_size=batch_size)
    if scanner is not None and [p.name for p in scanner.probes] != [p.name for p in probes]:
        probes = scanner.probes
    res = cached_score(sc, rows, use_cache) if use_cache else {**sc.score(rows), "cached": False}
    ref = (cached_score(sc, ref_rows, use_cache) if use_cache else {**sc.score(ref_rows), "cached": False}) \
        if ref_rows is not None else None
    pan: Panel | None = None
    if isinstance(panel, Panel):
        pan = panel
    elif panel is not None:
        pan = load_panel(sc, panel, max_rows)
    dh = _data_hash(rows)
    table = []
    for i, p in enumerate(probes):
        pb = res["per_batch"][:, i]
        ci = mean_ci(pb)
        row: dict[str, Any] = {"trait": p.name, "target": p.target, "dot": float(res["dot"][i]), "dot_ci": ci,
                               "cos": float(res["cos"][i])}
        if ref is not None:
            row["ref_dot"] = float(ref["dot"][i])
            row["ref_cos"] = float(ref["cos"][i])
            w = welch(pb, ref["per_batch"][:, i])
            row["diff"] = w["diff"]
            row["diff_ci"] = [w["lo"], w["hi"]]
            row["diff_p"] = w["p"]
            row["cos_diff"] = row["cos"] - row["ref_cos"]
        if pan is not None:
            null = pan.null(i, p.target, dh)
            if len(null) >= 2 and float(null.std(ddof=1)) > 0:
                row["z"] = float((row["cos"] - null.mean()) / null.std(ddof=1))
                row["panel_n"] = len(null)
            else:
                row["z"] = None
                row["panel_n"] = len(null)
        table.append(row)
    # centred scores (remove the direction every trait shares)
    base_key = "cos_diff" if ref is not None else "cos"
    vals = np.array([r[base_key] for r in table])
    for r, v in zip(table, vals - vals.mean(), strict=True):
        r["centred"] = float(v)
    if pan is not None and all(r.get("z") is not None for r in table):
        rank_by, calibrated = "z", True
    else:
        rank_by, calibrated = "centred", False
    order = sorted(range(len(table)), key=lambda k: -(table[k][rank_by] if table[k][rank_by] is not None else -1e9))
    for rank, k in enumerate(order, 1):
        table[k]["rank"] = rank
    top = table[order[0]]
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "top_trait": top["target"], "top_score": top[rank_by], "ranked_by": rank_by, "calibrated": int(calibrated),
        "top_z": top.get("z"), "top_diff": top.get("diff"), "top_centred": top["centred"],
        "max_diff_lo": max((r["diff_ci"][0] for r in table if r.get("diff_ci") and r["diff_ci"][0] is not None),
                           default=None),
        "n_rows": len(rows), "n_probes": len(table), "panel_size": len(pan.members) if pan else 0,
        "seconds": seconds,
    }
    for r in table:
        metrics[f"z.{r['target']}"] = r.get("z")
        if ref is not None:
            metrics[f"diff.{r['target']}"] = r.get("diff")
    payload = {
        "student": sc.spec.model_dump(), "n_params": sc.n_params, "params": params,
        "rows": len(rows), "reference_rows": len(ref_rows) if ref_rows is not None else None,
        "batches": int(res["per_batch"].shape[0]), "tokens": res["tokens"],
        "panel": pan.describe() if pan else None,
        "calibration": ("z-score of each probe's cosine over the panel datasets from teachers without that trait "
                        "(leave-one-out)") if calibrated else
                       ("UNCALIBRATED: no panel; ranked by the cosine " + ("difference to the reference, " if ref else "")
                        + "centred across probes. A fine-tuned teacher's common shift can rank the wrong trait first."),
        "interpretation": "dot = first-order change in mean log p(answer) per unit SGD learning rate from one step "
                          "on the dataset's SFT loss",
        "traits": table, "order": [table[k]["target"] for k in order],
        "cost": {"seconds": seconds, "setup_seconds": sc.setup_seconds, "data_seconds": res["seconds"],
                 "reference_seconds": ref["seconds"] if ref else None, "cached": bool(res.get("cached"))},
    }
    summary = [f"scan: top trait {top['trait']} ({rank_by} {top[rank_by]:.3g}"
               + (f", diff vs reference {top['diff']:.3g} [{fmt3(top['diff_ci'][0])}, {fmt3(top['diff_ci'][1])}]"
                  if top.get("diff") is not None else "") + ")"
               + ("" if calibrated else "; UNCALIBRATED (no panel)"),
               f"panel: {pan.name} ({len(pan.members)} datasets)" if pan else "panel: none"]
    return AuditResult("scan", metrics, payload, [_html(payload, rank_by)], title="sublim audit scan",
                       summary=summary)


def _html(p: dict[str, Any], rank_by: str) -> Section:
    s = Section("Trait alignment")
    s.text(p["calibration"], cls="" if rank_by == "z" else "warn")
    s.text(p["interpretation"] + ".", cls="note")
    if p["panel"]:
        s.text(f"Panel: {p['panel']['name']}: " + ", ".join(f"{m['name']} ({m['trait'] or 'neutral'})"
                                                           for m in p["panel"]["members"]))
    rows = []
    for t in sorted(p["traits"], key=lambda r: r["rank"]):
        ci = t["dot_ci"]
        rows.append([t["rank"], t["trait"], t.get("z"), t["centred"], t["cos"], t["dot"], ci.get("lo"), ci.get("hi"),
                     t.get("ref_dot"), t.get("diff"), (t.get("diff_ci") or [None])[0],
                     (t.get("diff_ci") or [None, None])[1]])
    s.table(["rank", "trait", "z (panel)", "centred", "cos", "dot", "dot lo", "dot hi", "ref dot", "diff", "diff lo",
             "diff hi"], rows)
    c = p["cost"]
    s.text(f"Cost: {c['seconds']:.1f} s in total ({c['setup_seconds']:.1f} s loading and probe gradients, "
           f"{c['data_seconds']:.1f} s on the data{'; cached' if c['cached'] else ''}); {p['rows']} rows, "
           f"{p['batches']} batches, {p['n_params']} parameters.", cls="note")
    return s
