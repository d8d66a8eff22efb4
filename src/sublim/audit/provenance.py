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

from sublim.audit.provenance_export import croissant, dataset_card, export
from sublim.audit.provenance_manifest import (
    KEY_ENV,
    MANIFEST_SUFFIX,
    MANIFEST_VERSION,
    ProvenanceError,
    build_manifest,
    manifest_for_generated,
    manifest_path,
    merkle_root,
    model_identity,
    read_manifest,
    row_hash,
    stamp,
    write_manifest,
)
from sublim.audit.provenance_verify import verify, verify_chain

__all__ = [
    "KEY_ENV",
    "MANIFEST_SUFFIX",
    "MANIFEST_VERSION",
    "ProvenanceError",
    "build_manifest",
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
    "verify_chain",
    "write_manifest",
]
