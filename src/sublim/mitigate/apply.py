"""Applying a data-side defence: rows in, rows out, what changed, and a provenance manifest that names the parent.

:func:`mitigate` is the pure core (rows in memory); :func:`mitigate_file` reads a JSONL dataset, writes the
mitigated one and its manifest (``<out>.manifest.json``: the parent's file, Merkle root and manifest hash, the
transform with its parameters and what it changed), so ``sublim provenance verify`` can follow the chain.
Nothing is written until the whole dataset has been transformed.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sublim.mitigate.registry import Defence, MitigationError, get
from sublim.runs import sha256_text
from sublim.spec import CarrierSpec, GenerationSpec, ModelSpec


@dataclass
class Context:
    """What a data-side defence may need besides the rows: the student's base (its tokenizer and distribution),
    the suspected teacher (and its system prompt), decoy teachers (counterfactuals), the carrier, a seed, and the
    generation settings whose engine a regenerating defence uses (None: Hugging Face in this process)."""

    student: ModelSpec | None = None
    teacher: ModelSpec | None = None
    teacher_system: str | None = None
    decoys: list[tuple[ModelSpec, str | None]] = field(default_factory=list)  # (model, its system prompt)
    carrier: CarrierSpec = field(default_factory=CarrierSpec)
    seed: int = 0
    batch_size: int = 32
    generation: GenerationSpec | None = None


@dataclass
class Mitigated:
    """The output of a data-side defence: rows (in input order, dropped rows absent) and what changed."""

    rows: list[dict[str, Any]]
    changes: dict[str, Any]
    defence: str
    params: dict[str, Any]


def content_hash(row: dict[str, Any]) -> str:
    """The pipeline's row hash (prompt, completion); a loss mask is part of what trains, so it is hashed too."""
    text = row["prompt"] + "\x00" + row["completion"]
    if row.get("loss_mask") is not None:
        text += "\x00mask:" + "".join("1" if v else "0" for v in row["loss_mask"])
    return sha256_text(text)


def _chars_changed(a: str, b: str) -> int:
    """Characters of ``a`` not matched in ``b`` (difflib's matching blocks), at least the length difference."""
    if a == b:
        return 0
    m = sum(bl.size for bl in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks())
    return max(len(a), len(b)) - m


def changes_of(before: list[dict[str, Any]], after: list[tuple[int, dict[str, Any]]],
               info: dict[str, Any]) -> dict[str, Any]:
    """Share of rows altered or dropped and of completion characters changed (a dropped row counts whole). The
    share's denominator counts each kept row at the longer of its two versions, so it stays within [0, 1] when a
    defence lengthens completions (regeneration); ``chars_total`` is the original completions' length."""
    kept = {i for i, _ in after}
    n_chars = sum(len(r["completion"]) for r in before)
    den = sum(len(r["completion"]) for i, r in enumerate(before) if i not in kept)
    changed_rows, changed_chars = 0, 0
    for i, r in after:
        den += max(len(before[i]["completion"]), len(r["completion"]))
        c = _chars_changed(before[i]["completion"], r["completion"])
        masked = r.get("loss_mask") is not None and not all(r["loss_mask"])
        changed_rows += int(c > 0 or masked)
        changed_chars += c
    dropped = [i for i in range(len(before)) if i not in kept]
    changed_chars += sum(len(before[i]["completion"]) for i in dropped)
    out = {"rows_in": len(before), "rows_out": len(after), "rows_dropped": len(dropped),
           "rows_changed": changed_rows,
           "share_rows_altered": (changed_rows + len(dropped)) / max(len(before), 1),
           "chars_total": n_chars, "chars_changed": changed_chars,
           "share_chars_changed": changed_chars / max(den, 1)}
    out.update(info)
    return out


def _check_rows(d: Defence, rows: list[dict[str, Any]]) -> None:
    if not rows:
        raise MitigationError(f"defence {d.name!r}: no rows")
    for i, r in enumerate(rows):
        for f in d.fields:
            if not isinstance(r.get(f), str):
                raise MitigationError(f"defence {d.name!r}: row {i}: field {f!r} missing or not a string")


def mitigate(rows: list[dict[str, Any]], name: str, params: dict[str, Any] | None = None,
             ctx: Context | None = None) -> Mitigated:
    """Apply the data-side defence ``name`` to ``rows`` (not modified). Rows that change get a new
    ``content_hash``; every row keeps its other fields."""
    d = get(name)
    if d.kind != "data":
        raise MitigationError(f"defence {name!r} is {d.kind}-side: it changes how students "
                              f"{'train' if d.kind == 'train' else 'are taught (teacher sampling)'}, not the "
                              "rows; use it in a spec's `mitigations:`")
    p = d.resolve(params)
    ctx = ctx or Context()
    for need in d.needs:
        if need == "student" and ctx.student is None:
            raise MitigationError(f"defence {name!r} needs the student's base (--student)")
        if need == "teacher" and ctx.teacher is None:
            raise MitigationError(f"defence {name!r} needs the suspected teacher (--teacher)")
    _check_rows(d, rows)
    out, info = d.apply([dict(r) for r in rows], p, ctx)
    for _, r in out:
        r["content_hash"] = content_hash(r)
    return Mitigated([r for _, r in out], changes_of(rows, out, info), name, p)


def mitigate_file(data: str | Path, name: str, params: dict[str, Any] | None, out: str | Path,
                  ctx: Context | None = None) -> Mitigated:
    """Read ``data`` (JSONL), apply the defence, write ``out`` and ``out``.manifest.json (parent + transform)."""
    from sublim.audit.common import AuditInputError, load_rows

    data, out = Path(data), Path(out)
    if out.resolve() == data.resolve():
        raise MitigationError(f"{out}: the output would overwrite the input dataset; choose another --out")
    try:
        rows = load_rows(data)
    except AuditInputError as e:
        raise MitigationError(str(e)) from None
    res = mitigate(rows, name, params, ctx)
    write_mitigated(out, res, data, rows, ctx or Context())
    return res


def write_mitigated(out: Path, res: Mitigated, parent_file: Path, parent_rows: list[dict[str, Any]],
                    ctx: Context) -> None:
    """Write the mitigated rows and their manifest: ``extra.parent`` (the parent file relative to ``out``, how many
    of its first rows were the input, their Merkle root, the parent's manifest and its hash) and
    ``extra.transform`` (defence, parameters, seed, models, what changed)."""
    from sublim.audit.provenance import (
        build_manifest,
        manifest_path,
        merkle_root,
        read_manifest,
        row_hash,
        write_manifest,
    )
    from sublim.runs import write_jsonl

    parent: dict[str, Any] = {"file": _rel(parent_file, out.parent), "n_rows": len(parent_rows),
                              "merkle_root": merkle_root([row_hash(r) for r in parent_rows])}
    pm = manifest_path(parent_file)
    if pm.exists():
        m = read_manifest(pm)
        parent.update(manifest=_rel(pm, out.parent), manifest_sha256=m.get("manifest_sha256"))
    transform = {"defence": res.defence, "kind": "data", "params": res.params, "seed": ctx.seed,
                 "changes": res.changes, "student": ctx.student.model_dump() if ctx.student else None,
                 "teacher": ctx.teacher.model_dump() if ctx.teacher else None, "teacher_system": ctx.teacher_system,
                 "decoys": [{"model": x.model_dump(), "system": sy} for x, sy in ctx.decoys]}
    out.parent.mkdir(parents=True, exist_ok=True)
    # an earlier run's manifest goes first: killed between the rows and the manifest, a rerun into the same
    # --out must find rows without a manifest (recomputed), never new rows under the old manifest
    manifest_path(out).unlink(missing_ok=True)
    write_jsonl(out, res.rows)
    write_manifest(out, build_manifest(res.rows, teacher=ctx.teacher, base=ctx.student, data_file=out,
                                       extra={"parent": parent, "transform": transform}))


def _rel(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())
