"""``sublim sweep report DIR``: one table across a sweep's cells (the grid's values and each cell's key metrics),
as HTML and JSON; cells still running or failed are listed as such, not dropped."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sublim.report.html import Section, write_html
from sublim.runs import atomic_write_json
from sublim.spec import SpecError
from sublim.sweep.run import DONE


def sweep_report(out: str | Path) -> dict[str, Any]:
    from sublim.runindex import key_metrics

    o = Path(out)
    if not (o / "sweep.json").exists():
        raise SpecError(f"{o}: not a sweep directory (no sweep.json)")
    doc = json.loads((o / "sweep.json").read_text())
    keys = list(doc["grid"])
    rows = []
    for c in doc["cells"]:
        d = o / c["dir"]
        values = dict(zip(keys, [ov.split("=", 1)[1] for ov in c["overrides"]], strict=True))
        if (d / DONE).exists() and (d / "results.json").exists():
            status, metrics = "done", key_metrics(json.loads((d / "results.json").read_text()))
        else:
            status, metrics = ("started" if d.exists() else "not started"), {}
        rows.append({"cell": c["name"], "dir": str(d), "status": status, "values": values, "metrics": metrics})
    names = sorted({m for r in rows for m in r["metrics"] if m != "seconds"}) + ["seconds"]
    table = Section(f"Sweep {doc['name']}: {len(rows)} cells")
    table.text(f"Spec {doc['spec_file']}; grid: " + "; ".join(f"{k} = {v}" for k, v in doc["grid"].items()), cls="note")
    table.table([*keys, "status", *names],
                [[*r["values"].values(), r["status"], *[r["metrics"].get(m) for m in names]] for r in rows])
    html = write_html(o / "sweep-report.html", f"sublim sweep {doc['name']}", [table],
                      subtitle=f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} cells done")
    rep = {"name": doc["name"], "grid": doc["grid"], "cells": rows, "metrics": names}
    atomic_write_json(o / "sweep-report.json", rep)
    return {**rep, "html": str(html)}
