"""Verifying a dataset against its provenance manifest (every changed, removed, added or moved row by index),
and following a mitigated dataset's chain back through its parents."""
from __future__ import annotations

import difflib
import hmac
import os
from pathlib import Path
from typing import Any

from sublim.audit.provenance_manifest import (
    KEY_ENV,
    ProvenanceError,
    _field_hashes,
    _load_rows,
    _manifest_digest,
    _sign,
    manifest_path,
    merkle_root,
    read_manifest,
    row_hash,
)
from sublim.runs import sha256_file

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


def verify_chain(data: str | Path, *, key: str | None = None, max_depth: int = 32) -> list[dict[str, Any]]:
    """Verify ``data`` and every dataset it was derived from: a mitigated dataset's manifest names its parent
    (``extra.parent``: file, how many of its first rows were the input, their Merkle root, the parent's manifest
    hash). One result per link, ``data`` first; each link also checks that the parent still holds the rows the
    child was made from (``parent_ok``) and that its manifest is the one the child recorded."""
    links: list[dict[str, Any]] = []
    cur = Path(data)
    for _ in range(max_depth):
        res = verify(cur, key=key)
        links.append(res)
        m = read_manifest(manifest_path(cur))
        parent = (m.get("extra") or {}).get("parent")
        if not parent:
            break
        pfile = (cur.parent / str(parent.get("file"))).resolve()
        res["parent"] = str(pfile)
        res["transform"] = (m.get("extra") or {}).get("transform")
        if not pfile.exists():
            res["parent_ok"] = False
            res["ok"] = False
            res["problems"].append(f"parent dataset {pfile} (recorded in the manifest) is missing")
            break
        prows = _load_rows(pfile)
        n = int(parent.get("n_rows") or 0)
        root = merkle_root([row_hash(r) for r in prows[:n]])
        res["parent_ok"] = root == parent.get("merkle_root") and len(prows) >= n
        if not res["parent_ok"]:
            res["ok"] = False
            res["problems"].append(f"parent {pfile}: its first {n} rows no longer have the Merkle root the child "
                                   f"recorded ({parent.get('merkle_root')}); it changed after the child was made")
        pm = manifest_path(pfile)
        if parent.get("manifest_sha256") and pm.exists() and \
                read_manifest(pm).get("manifest_sha256") != parent["manifest_sha256"]:
            res["ok"] = False
            res["problems"].append(f"parent manifest {pm} is not the one the child recorded")
        if not pm.exists():
            break
        cur = pfile
    return links
