"""Provenance manifests: per-row content hashes, a Merkle root, identities and settings; build, write, read.

See :mod:`sublim.audit.provenance` for the whole picture."""
from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sublim.runs import (
    atomic_write_json,
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
    from sublim.models import model_id

    # the declared name, not the path: a manifest reads the same wherever the run directory lives
    ident: dict[str, Any] = {"id": model_id(spec), "adapter": Path(spec.adapter).name if spec.adapter else None,
                             "revision": spec.revision, "dtype": spec.dtype}
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


