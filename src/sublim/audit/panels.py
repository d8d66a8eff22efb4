"""Calibration panels for the gradient scan: datasets from decoy teachers of other traits, scored with the same
scanner, so each probe's cosine can be standardised against what it looks like without that trait."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sublim.audit.common import AuditInputError, load_rows, model_spec
from sublim.audit.gradients import GradientScanner, _cache_dir, _data_hash, cached_score
from sublim.runs import atomic_write_json, hash_obj

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
        rows = generate(teacher, carrier, g, out / "raw" / f"{name}.jsonl", category=category)
        kept = filter_rows(rows, filters, carrier, list(traits)).kept[:n_rows]
        write_jsonl(dst, kept)
    atomic_write_json(out / "panel.json", {"name": f"decoys-{category}-{key[:8]}", "base": spec.model_dump(),
                                           "category": category, "traits": list(traits), "n_rows": n_rows,
                                           "datasets": [{"path": f"{n}.jsonl", "trait": None if s is not None else n}
                                                        for n, s in jobs]})
    return out


