"""``sublim provenance stamp|verify|export``: sidecar manifests with a Merkle root, and their verification.

Mount in the main CLI with ``app.add_typer(provenance_app, name="provenance")``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from sublim.audit._cli_util import fail, guard

app = typer.Typer(help="Dataset provenance: stamp a manifest (row hashes + Merkle root), verify it, export "
                       "a dataset card and Croissant metadata.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)


def _json_arg(value: str | None, what: str) -> Any:
    """A JSON literal, a path to a JSON/YAML file, or KEY=VALUE pairs separated by commas."""
    if value is None:
        return None
    p = Path(value)
    if p.exists() and p.is_file():
        import yaml

        try:
            return yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            fail(f"--{what} {p}: not valid JSON/YAML ({str(e).splitlines()[0]})")
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    if "=" in value:
        out: dict[str, Any] = {}
        for part in value.split(","):
            k, _, v = part.partition("=")
            out[k.strip()] = v.strip()
        return out
    if what == "trait" and ":" in value:
        cat, _, target = value.partition(":")
        return {"category": cat, "target": target}
    return value


@app.command()
def stamp(
    data: Annotated[Path, typer.Argument(help="Dataset JSONL")],
    teacher: Annotated[str | None, typer.Option(help="Teacher model (directory / id); hashed")] = None,
    teacher_adapter: Annotated[str | None, typer.Option(help="Teacher LoRA adapter directory")] = None,
    teacher_system: Annotated[str | None, typer.Option(help="Teacher system prompt (hashed)")] = None,
    base: Annotated[str | None, typer.Option(help="Base model of the intended student; hashed")] = None,
    trait: Annotated[str | None, typer.Option(help="Trait spec: 'animals:owl', JSON, or a JSON/YAML file")] = None,
    generation: Annotated[str | None, typer.Option(help="Generation settings: JSON, KEY=V,..., or a file")] = None,
    filters: Annotated[str | None, typer.Option(help="Filter settings: JSON, KEY=V,..., or a file")] = None,
    export: Annotated[bool, typer.Option(help="Also write README.md (HF dataset card) and croissant.json")] = False,
    export_dir: Annotated[Path | None, typer.Option(help="Where to write the exports (default: beside DATA)")] = None,
) -> None:
    """Write DATA.manifest.json: identities with weight hashes, settings, per-row hashes, Merkle root.

    Set $SUBLIM_MANIFEST_KEY to also sign the manifest (HMAC-SHA256)."""
    from sublim.audit import provenance as pv
    from sublim.audit.common import model_spec

    t: Any = None
    if teacher:
        tspec = guard(model_spec, teacher, teacher_adapter, "teacher")
        if teacher_system:
            from sublim.teachers import Teacher

            t = Teacher(tspec, teacher_system, None, "system_prompt")
        else:
            t = tspec
    b = guard(model_spec, base, None, "base") if base else None
    m = guard(pv.stamp, data, teacher=t, base=b, trait=_json_arg(trait, "trait"),
              generation=_json_arg(generation, "generation"), filters=_json_arg(filters, "filters"))
    typer.echo(f"{m['n_rows']} rows, Merkle root {m['merkle_root']}")
    typer.echo(f"manifest: {pv.manifest_path(data)}")
    if export:
        paths = guard(pv.export, data, export_dir)
        typer.echo(f"dataset card: {paths['card']}  croissant: {paths['croissant']}")


@app.command()
def verify(
    data: Annotated[Path, typer.Argument(help="Dataset JSONL")],
    manifest: Annotated[Path | None, typer.Option(help="Manifest (default DATA.manifest.json)")] = None,
    expected_root: Annotated[str | None, typer.Option(help="Merkle root published out of band")] = None,
    out: Annotated[Path | None, typer.Option(help="Write verify.json and verify.html into this directory")] = None,
) -> None:
    """Check every row against the manifest; name each changed, removed, added or moved row.

    Exit 0 if intact, 1 if anything was tampered with, 2 on bad input."""
    from sublim.audit import provenance as pv

    res = guard(pv.verify, data, manifest, expected_root=expected_root)
    if out is not None:
        from sublim.audit.common import AuditResult
        from sublim.report.html import Section

        sec = Section("Rows")
        rows = ([["changed", c["index"], c["new_index"], c["old_hash"][:16], c["new_hash"][:16],
                  ",".join(c["parts"])] for c in res["changed"]]
                + [["removed", r["index"], "", r["hash"][:16], "", ""] for r in res["removed"]]
                + [["added", "", a["index"], "", a["hash"][:16], ""] for a in res["added"]]
                + [["moved", d["index"], d["new_index"], d["hash"][:16], d["hash"][:16], ""] for d in res["moved"]])
        sec.table(["what", "manifest index", "data index", "manifest hash", "data hash", "parts"], rows[:1000])
        metrics = {"ok": int(res["ok"]), "changed": len(res["changed"]), "removed": len(res["removed"]),
                   "added": len(res["added"]), "moved": len(res["moved"]),
                   "manifest_intact": int(res["manifest_intact"])}
        ar = AuditResult("verify", metrics, res, [sec], title=f"sublim provenance verify {data}",
                         summary=res["problems"] or ["intact"])
        ar.crossed = [] if res["ok"] else [{"rule": "tampering", "metric": "ok", "value": 0}]
        paths = ar.write(out)
        typer.echo(f"report: {paths['html']}  json: {paths['json']}")
    # a mitigated dataset names its parent: follow the chain (each link: the parent still holds the rows the
    # child was made from, and matches its own manifest)
    links = guard(pv.verify_chain, data) if manifest is None and expected_root is None else [res]
    ok = res["ok"] and all(link["ok"] for link in links)
    for i, link in enumerate(links):
        what = "" if i == 0 else f"parent {i}: "
        problems = link["problems"]
        t = link.get("transform") or {}
        via = f" (made from its parent by {t.get('defence')} {json.dumps(t.get('params'))})" if t else ""
        if not problems:
            typer.echo(f"OK: {what}{link['n_rows_data']} rows of {link['data']} match {link['manifest']} "
                       f"(Merkle root {link['merkle_root_data']}){via}")
        for p in problems:
            typer.echo(f"TAMPERED: {what}{p}", err=True)
    if not ok:
        raise typer.Exit(1)


@app.command("export")
def export_cmd(
    data: Annotated[Path, typer.Argument(help="A stamped dataset JSONL")],
    out: Annotated[Path | None, typer.Option(help="Directory for README.md and croissant.json")] = None,
    license: Annotated[str, typer.Option(help="License id for the dataset card")] = "other",
) -> None:
    """Write a Hugging Face dataset card (README.md) and Croissant JSON-LD from DATA's manifest."""
    from sublim.audit import provenance as pv

    paths = guard(pv.export, data, out, license)
    typer.echo(f"dataset card: {paths['card']}  croissant: {paths['croissant']}")
