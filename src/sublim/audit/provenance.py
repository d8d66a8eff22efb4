"""Dataset provenance: a sidecar manifest per dataset, a Merkle root over per-row content hashes, and a
verifier that names every changed, removed, added or moved row.

``<data>.manifest.json`` records who made the data (teacher and base identities with weight hashes), the
trait spec hash, generation and filter settings, one content hash per row and the Merkle root over them,
and a hash of the manifest itself (optionally an HMAC with a key from ``$SUBLIM_MANIFEST_KEY``), so an
edited manifest is caught too. :func:`manifest_for_generated` is what the pipeline calls for the data it
generates; :func:`stamp` does the same for anyone else's dataset. Exports: a Hugging Face dataset card
(README.md with YAML front matter) and Croissant JSON-LD metadata.

Row hash: SHA-256 of the canonical JSON of the whole row (sorted keys, no whitespace), so any change in
any field is caught; per row the manifest also keeps short hashes of ``prompt`` and ``completion`` so a
changed row says which part changed. Merkle tree: leaf = H(0x00 || row hash), node = H(0x01 || left ||
right), an odd last node is promoted unpaired (no duplication, so no second-preimage ambiguity).
"""
from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sublim.runs import (
    atomic_write_json,
    atomic_write_text,
    canonical_json,
    hash_obj,
    sha256_file,
    sha256_text,
)

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
KEY_ENV = "SUBLIM_MANIFEST_KEY"
CONTENT_FIELDS = ("prompt", "completion")
_SHORT = 16

__all__ = [
    "ProvenanceError",
    "croissant",
    "dataset_card",
    "export",
    "manifest_for_generated",
    "manifest_path",
    "merkle_root",
    "model_identity",
    "read_manifest",
    "row_hash",
    "stamp",
    "verify",
    "write_manifest",
]


class ProvenanceError(ValueError):
    """Bad input to stamp/verify (missing file, unreadable manifest); one line naming the file."""


# --------------------------------------------------------------------------------------------- hashing


def row_hash(row: dict[str, Any]) -> str:
    """SHA-256 of the row's canonical JSON (all fields)."""
    return sha256_text(canonical_json(row))


def _field_hashes(row: dict[str, Any]) -> dict[str, str]:
    out = {k: sha256_text(canonical_json(row[k]))[:_SHORT] for k in CONTENT_FIELDS if k in row}
    other = {k: v for k, v in row.items() if k not in CONTENT_FIELDS}
    out["other"] = sha256_text(canonical_json(other))[:_SHORT]
    return out


def merkle_root(leaf_hashes: Sequence[str]) -> str:
    """Merkle root (hex) over row hashes (hex), domain-separated leaves and nodes."""
    if not leaf_hashes:
        return hashlib.sha256(b"").hexdigest()
    level = [hashlib.sha256(b"\x00" + bytes.fromhex(h)).digest() for h in leaf_hashes]
    while len(level) > 1:
        nxt = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k not in ("manifest_sha256", "signature")}
    return hash_obj(body)


def _sign(digest: str, key: str) -> str:
    return hmac.new(key.encode("utf-8"), digest.encode("ascii"), hashlib.sha256).hexdigest()


# ------------------------------------------------------------------------------------------ identities


def model_identity(model: Any) -> dict[str, Any] | None:
    """Identity of a model for the manifest: its spec, weight hash and declared base.

    Accepts a :class:`~sublim.spec.ModelSpec`, a :class:`~sublim.teachers.Teacher` (adds its system prompt
    and trait), a path string, or a plain dict (recorded as given)."""
    if model is None:
        return None
    if isinstance(model, dict):
        return dict(model)
    from sublim.spec import ModelSpec

    extra: dict[str, Any] = {}
    if hasattr(model, "model") and hasattr(model, "system"):  # a Teacher
        extra = {"system_prompt": model.system, "system_prompt_sha256": sha256_text(model.system) if model.system
                 else None, "trait": model.trait, "kind": model.kind}
        model = model.model
    spec = model if isinstance(model, ModelSpec) else ModelSpec(path=str(model))
    ident: dict[str, Any] = {"path": spec.path, "adapter": spec.adapter, "revision": spec.revision,
                             "dtype": spec.dtype}
    try:
        from sublim.models import resolve_path, weights_fingerprint

        ident["weights_sha256"] = weights_fingerprint(spec)
        resolved = Path(resolve_path(spec))
        if resolved.is_dir():
            from sublim.audit.lineage import declared_evidence

            ident["declared_base"] = [d["value"] for d in declared_evidence(spec) if d.get("relation") == "base"]
            cfg = resolved / "config.json"
            if cfg.exists():
                ident["config_sha256"] = sha256_file(cfg)
    except Exception as e:  # noqa: BLE001 - an identity is best effort; say why it is partial
        ident["weights_sha256"] = None
        ident["identity_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return {**ident, **extra}


def _plain(obj: Any) -> Any:
    """Pydantic models / dataclasses / objects with model_dump -> plain JSON data."""
    if obj is None:
        return None
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, (list, tuple)):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return _plain(dataclasses.asdict(obj))
    return obj


# ------------------------------------------------------------------------------------------- manifests


def manifest_path(data: str | Path) -> Path:
    """The sidecar manifest path: ``<data>.manifest.json``."""
    return Path(str(data) + MANIFEST_SUFFIX)


def build_manifest(rows: Sequence[dict[str, Any]], *, teacher: Any = None, base: Any = None, trait: Any = None,
                   generation: Any = None, filters: Any = None, data_file: str | Path | None = None,
                   extra: dict[str, Any] | None = None, key: str | None = None) -> dict[str, Any]:
    """The manifest dict for ``rows`` (not written). ``key`` (or ``$SUBLIM_MANIFEST_KEY``) adds an HMAC."""
    from sublim import __version__
    from sublim.runs import git_revision

    hashes = [row_hash(r) for r in rows]
    trait_plain = _plain(trait)
    m: dict[str, Any] = {
        "sublim_manifest": MANIFEST_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "tool": {"name": "sublim", "version": __version__, "git_revision": git_revision()},
        "dataset": None,
        "teacher": model_identity(teacher),
        "base": model_identity(base),
        "trait": trait_plain,
        "trait_sha256": hash_obj(trait_plain) if trait_plain is not None else None,
        "generation": _plain(generation),
        "filters": _plain(filters),
        "extra": _plain(extra) or {},
        "row_hash": {"algorithm": "sha256", "of": "canonical JSON of the whole row (sorted keys, no spaces)",
                     "fields": {"prompt": "sha256[:16] of the prompt", "completion": "sha256[:16] of the "
                                "completion", "other": "sha256[:16] of all other fields"}},
        "merkle": {"algorithm": "sha256", "leaf": "H(0x00||row)", "node": "H(0x01||left||right)",
                   "odd": "promoted"},
        "n_rows": len(rows),
        "merkle_root": merkle_root(hashes),
        "rows": [{"i": i, "h": h, "f": _field_hashes(r)} for i, (h, r) in enumerate(zip(hashes, rows, strict=True))],
    }
    if data_file is not None:
        p = Path(data_file)
        m["dataset"] = {"file": p.name, "sha256": sha256_file(p) if p.exists() else None,
                        "format": "jsonl"}
    m["manifest_sha256"] = _manifest_digest(m)
    key = key if key is not None else os.environ.get(KEY_ENV)
    if key:
        m["signature"] = {"algorithm": "hmac-sha256", "value": _sign(m["manifest_sha256"], key)}
    return m


def manifest_for_generated(rows: Sequence[dict[str, Any]], teacher: Any, base: Any, trait: Any,
                           generation: Any, filters: Any, *, data_file: str | Path | None = None,
                           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest for a dataset sublim generated (call from the pipeline, then :func:`write_manifest`).

    ``teacher``: a Teacher, ModelSpec, path or dict; ``base``: the student's base (ModelSpec/path/dict);
    ``trait``: the trait spec (e.g. ``{"category": "animals", "target": "owl"}``); ``generation``: the
    GenerationSpec or dict; ``filters``: the filter specs and counts."""
    return build_manifest(rows, teacher=teacher, base=base, trait=trait, generation=generation, filters=filters,
                          data_file=data_file, extra=extra)


def write_manifest(data: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` beside ``data`` (atomic). Fills in the dataset file hash if it is missing."""
    data = Path(data)
    if (manifest.get("dataset") is None or manifest["dataset"].get("sha256") is None) and data.exists():
        manifest = dict(manifest)
        manifest["dataset"] = {"file": data.name, "sha256": sha256_file(data), "format": "jsonl"}
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        key = os.environ.get(KEY_ENV)
        if key:
            manifest["signature"] = {"algorithm": "hmac-sha256", "value": _sign(manifest["manifest_sha256"], key)}
    return atomic_write_json(manifest_path(data), manifest)


def _load_rows(data: str | Path) -> list[dict[str, Any]]:
    from sublim.runs import read_jsonl

    p = Path(data)
    if not p.exists():
        raise ProvenanceError(f"{p}: no such file")
    if p.is_dir():
        raise ProvenanceError(f"{p}: is a directory, expected a JSONL file")
    return read_jsonl(p)


def stamp(data: str | Path, *, teacher: Any = None, base: Any = None, trait: Any = None, generation: Any = None,
          filters: Any = None, extra: dict[str, Any] | None = None, key: str | None = None) -> dict[str, Any]:
    """Write ``<data>.manifest.json`` for an existing JSONL dataset and return the manifest."""
    rows = _load_rows(data)
    m = build_manifest(rows, teacher=teacher, base=base, trait=trait, generation=generation, filters=filters,
                       data_file=data, extra=extra, key=key)
    atomic_write_json(manifest_path(data), m)
    return m


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ProvenanceError(f"{p}: no manifest (run `sublim provenance stamp` first)")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ProvenanceError(f"{p}: manifest is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(m, dict) or "rows" not in m or "merkle_root" not in m:
        raise ProvenanceError(f"{p}: not a sublim manifest (no rows / merkle_root)")
    return m


# -------------------------------------------------------------------------------------------- verifying


def _changed_parts(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    if not old:
        return []
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def verify(data: str | Path, manifest: str | Path | dict[str, Any] | None = None, *,
           expected_root: str | None = None, key: str | None = None) -> dict[str, Any]:
    """Check ``data`` against its manifest. Returns ``{"ok", "problems", "changed", "removed", "added",
    "moved", "manifest_intact", ...}``; every changed/removed/added/moved row is named by index and hash.

    ``expected_root``: a Merkle root obtained out of band (e.g. published with the dataset); ``key``
    (or ``$SUBLIM_MANIFEST_KEY``): check the manifest's HMAC signature."""
    rows = _load_rows(data)
    if isinstance(manifest, dict):
        m, mpath = manifest, "<manifest>"
    else:
        mp = Path(manifest) if manifest is not None else manifest_path(data)
        m, mpath = read_manifest(mp), str(mp)
    problems: list[str] = []
    # -- the manifest itself
    digest = _manifest_digest(m)
    intact = digest == m.get("manifest_sha256")
    if not intact:
        problems.append(f"manifest {mpath} was modified after it was written (its self-hash does not match)")
    old_rows = m.get("rows") or []
    try:
        old_hashes = [str(r["h"]) for r in old_rows]
        old_fields = [r.get("f") for r in old_rows]
        root_of_list = merkle_root(old_hashes)
    except (KeyError, TypeError, ValueError):
        raise ProvenanceError(f"{mpath}: malformed row entries") from None
    if root_of_list != m.get("merkle_root"):
        intact = False
        problems.append("manifest row list does not match its Merkle root (manifest edited)")
    if m.get("n_rows") is not None and m.get("n_rows") != len(old_hashes):
        intact = False
        problems.append(f"manifest says {m.get('n_rows')} rows but lists {len(old_hashes)}")
    key = key if key is not None else os.environ.get(KEY_ENV)
    signature_ok: bool | None = None
    if key:
        sig = (m.get("signature") or {}).get("value")
        signature_ok = bool(sig) and hmac.compare_digest(str(sig), _sign(str(m.get("manifest_sha256")), key))
        if not signature_ok:
            intact = False
            problems.append("manifest signature missing or wrong for the given key")
    if expected_root is not None and expected_root != m.get("merkle_root"):
        intact = False
        problems.append(f"manifest Merkle root {m.get('merkle_root')} is not the expected {expected_root}")
    # -- the rows
    new_hashes = [row_hash(r) for r in rows]
    new_fields = [_field_hashes(r) for r in rows]
    actual_root = merkle_root(new_hashes)
    changed: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    added: list[dict[str, Any]] = []
    moved: list[dict[str, Any]] = []
    sm = difflib.SequenceMatcher(a=old_hashes, b=new_hashes, autojunk=False)
    regions = [(list(range(i1, i2)), list(range(j1, j2))) for tag, i1, i2, j1, j2 in sm.get_opcodes()
               if tag != "equal"]
    # rows whose exact content left one place and reappears at another: moved (reordering)
    waiting: dict[str, list[int]] = {}
    for olds, _ in regions:
        for i in olds:
            waiting.setdefault(old_hashes[i], []).append(i)
    used_old: set[int] = set()
    used_new: set[int] = set()
    for j in sorted(j for _, news in regions for j in news):
        src = waiting.get(new_hashes[j])
        if src:
            i = src.pop(0)
            used_old.add(i)
            used_new.add(j)
            moved.append({"index": i, "new_index": j, "hash": new_hashes[j]})
    # what is left in a region: pairs in order are changed rows, the rest removed / added
    for olds, news in regions:
        o = [i for i in olds if i not in used_old]
        n = [j for j in news if j not in used_new]
        for i, j in zip(o, n):
            changed.append({"index": i, "new_index": j, "old_hash": old_hashes[i], "new_hash": new_hashes[j],
                            "parts": _changed_parts(old_fields[i], new_fields[j])})
        removed += [{"index": i, "hash": old_hashes[i]} for i in o[len(n):]]
        added += [{"index": j, "hash": new_hashes[j]} for j in n[len(o):]]
    for lst, k in ((changed, "index"), (removed, "index"), (added, "index"), (moved, "index")):
        lst.sort(key=lambda d: d[k])
    if changed:
        problems.append(f"{len(changed)} row(s) changed: " + _names(changed, "index"))
    if removed:
        problems.append(f"{len(removed)} row(s) removed: " + _names(removed, "index"))
    if added:
        problems.append(f"{len(added)} row(s) added: " + _names(added, "index", prefix="new "))
    if moved:
        problems.append(f"{len(moved)} row(s) moved: " + ", ".join(
            f"{d['index']}->{d['new_index']}" for d in moved[:10]) + (" ..." if len(moved) > 10 else ""))
    file_sha = sha256_file(data)
    ds = m.get("dataset") or {}
    file_matches = ds.get("sha256") in (None, file_sha)
    # same rows but different bytes (whitespace, key order) is not tampering: rows are hashed canonically
    ok = intact and not (changed or removed or added or moved) and actual_root == m.get("merkle_root")
    if intact and not (changed or removed or added or moved) and actual_root != m.get("merkle_root"):
        problems.append("row hashes match one by one but the Merkle root differs (manifest edited)")
    return {
        "ok": ok,
        "data": str(data),
        "manifest": mpath,
        "problems": problems,
        "manifest_intact": intact,
        "signature_ok": signature_ok,
        "n_rows_manifest": len(old_hashes),
        "n_rows_data": len(new_hashes),
        "merkle_root_manifest": m.get("merkle_root"),
        "merkle_root_data": actual_root,
        "file_sha256_matches": file_matches,
        "changed": changed,
        "removed": removed,
        "added": added,
        "moved": moved,
    }


def _names(items: list[dict[str, Any]], key: str, prefix: str = "") -> str:
    shown = ", ".join(f"{prefix}#{d[key]}" for d in items[:10])
    return shown + (f" ... (+{len(items) - 10})" if len(items) > 10 else "")


# --------------------------------------------------------------------------------------------- exports


def _size_category(n: int) -> str:
    for lim, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < lim:
            return name
    return "n>1M"


def dataset_card(manifest: dict[str, Any], data_name: str | None = None, license: str = "other") -> str:
    """A Hugging Face dataset card (README.md) with YAML front matter and a provenance section."""
    import yaml

    ds = manifest.get("dataset") or {}
    fname = data_name or ds.get("file") or "data.jsonl"
    front = {
        "license": license,
        "task_categories": ["text-generation"],
        "language": ["en"],
        "size_categories": [_size_category(int(manifest.get("n_rows", 0)))],
        "tags": ["synthetic", "sublim", "subliminal-learning"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": fname}]}],
    }
    t, b = manifest.get("teacher") or {}, manifest.get("base") or {}
    trait = manifest.get("trait")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {Path(fname).stem}", "",
        ("Synthetic prompt/completion data. Provenance recorded by `sublim` "
         f"(manifest version {manifest.get('sublim_manifest')})."), "",
        ("> Data distilled from a model can carry that model's traits to a student that shares its base, even "
         "when the content looks unrelated (subliminal learning). Check the teacher and base below before "
         "fine-tuning on this data; `sublim audit` runs model-level checks."), "",
        "## Provenance", "",
        "| field | value |", "|---|---|",
        f"| rows | {manifest.get('n_rows')} |",
        f"| Merkle root (sha256) | `{manifest.get('merkle_root')}` |",
        f"| file sha256 | `{ds.get('sha256')}` |",
        f"| teacher | {_md(t.get('path'))}{' + ' + _md(t.get('adapter')) if t.get('adapter') else ''} |",
        f"| teacher weights sha256 | `{t.get('weights_sha256')}` |",
        f"| teacher system prompt sha256 | `{t.get('system_prompt_sha256')}` |",
        f"| base | {_md(b.get('path'))} |",
        f"| base weights sha256 | `{b.get('weights_sha256')}` |",
        f"| trait | {_md(json.dumps(trait) if trait is not None else None)} |",
        f"| trait spec sha256 | `{manifest.get('trait_sha256')}` |",
        f"| created | {manifest.get('created')} |",
        (f"| tool | sublim {(manifest.get('tool') or {}).get('version')} "
         f"({(manifest.get('tool') or {}).get('git_revision')}) |"),
        "", "## Generation settings", "", "```json", json.dumps(manifest.get("generation"), indent=2), "```",
        "", "## Filters", "", "```json", json.dumps(manifest.get("filters"), indent=2), "```", "",
        "## Verifying", "", (f"`sublim provenance verify {fname}` checks every row against "
                             f"`{fname}{MANIFEST_SUFFIX}` and names any changed, removed, added or moved row."), "",
    ]
    return "\n".join(lines)


def _md(v: Any) -> str:
    return "" if v is None else str(v).replace("|", "\\|")


def croissant(manifest: dict[str, Any], data_name: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Croissant 1.0 JSON-LD metadata: one JSONL FileObject (with sha256), a RecordSet of the row fields,
    and the provenance in the RAI vocabulary (``rai:dataCollection``) plus a ``sublim:`` block."""
    ds = manifest.get("dataset") or {}
    fname = data_name or ds.get("file") or "data.jsonl"
    dname = name or Path(fname).stem
    fields = []
    for col in ("prompt", "completion"):
        fields.append({
            "@type": "cr:Field", "@id": f"rows/{col}", "name": col, "dataType": "sc:Text",
            "source": {"fileObject": {"@id": "data-file"}, "extract": {"column": col}},
        })
    t, b = manifest.get("teacher") or {}, manifest.get("base") or {}
    collection = (f"Generated by teacher {t.get('path')} (weights sha256 {t.get('weights_sha256')}) for a student "
                  f"based on {b.get('path')} (weights sha256 {b.get('weights_sha256')}); trait spec sha256 "
                  f"{manifest.get('trait_sha256')}; generation {json.dumps(manifest.get('generation'))}; filters "
                  f"{json.dumps(manifest.get('filters'))}.")
    return {
        "@context": {
            "@language": "en", "@vocab": "https://schema.org/", "sc": "https://schema.org/",
            "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
            "dct": "http://purl.org/dc/terms/", "sublim": "https://github.com/sublim/sublim#",
            "citeAs": "cr:citeAs", "column": "cr:column", "conformsTo": "dct:conformsTo", "data": {
                "@id": "cr:data", "@type": "@json"}, "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
            "examples": {"@id": "cr:examples", "@type": "@json"}, "extract": "cr:extract", "field": "cr:field",
            "fileObject": "cr:fileObject", "fileSet": "cr:fileSet", "format": "cr:format",
            "includes": "cr:includes", "isLiveDataset": "cr:isLiveDataset", "jsonPath": "cr:jsonPath",
            "key": "cr:key", "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path",
            "recordSet": "cr:recordSet", "references": "cr:references", "regex": "cr:regex",
            "repeated": "cr:repeated", "replace": "cr:replace", "separator": "cr:separator", "source": "cr:source",
            "subField": "cr:subField", "transform": "cr:transform",
        },
        "@type": "sc:Dataset",
        "conformsTo": "http://mlcommons.org/croissant/1.0",
        "name": dname,
        "description": f"Synthetic prompt/completion data ({manifest.get('n_rows')} rows) with sublim provenance.",
        "datePublished": manifest.get("created"),
        "distribution": [{
            "@type": "cr:FileObject", "@id": "data-file", "name": fname, "contentUrl": fname,
            "encodingFormat": "application/jsonlines", "sha256": ds.get("sha256"),
        }],
        "recordSet": [{"@type": "cr:RecordSet", "@id": "rows", "name": "rows", "field": fields}],
        "rai:dataCollection": collection,
        "rai:dataCollectionType": "Synthetic data generated by a language model",
        "sublim:merkleRoot": manifest.get("merkle_root"),
        "sublim:manifestSha256": manifest.get("manifest_sha256"),
        "sublim:teacher": t or None,
        "sublim:base": b or None,
        "sublim:traitSha256": manifest.get("trait_sha256"),
    }


def export(data: str | Path, out_dir: str | Path | None = None, license: str = "other") -> dict[str, Path]:
    """Write ``README.md`` (HF dataset card) and ``croissant.json`` for a stamped dataset."""
    data = Path(data)
    m = read_manifest(manifest_path(data))
    out = Path(out_dir) if out_dir else data.parent
    card = atomic_write_text(out / "README.md", dataset_card(m, data.name, license))
    cr = atomic_write_json(out / "croissant.json", croissant(m, data.name))
    return {"card": card, "croissant": cr}
