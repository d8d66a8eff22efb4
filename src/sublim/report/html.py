"""Self-contained HTML pages: figures embedded as base64 PNG, tables from rows, no external assets."""
from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment

from sublim.runs import atomic_write_text

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title|e }}</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.5em 0}
.note{color:#555;font-size:.92em}pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}
.warn{background:#fff4e0;border-left:4px solid #e69500;padding:.4em .8em}
.scroll{overflow-x:auto;max-width:100%}.verdict{background:#eef5ff;border-left:4px solid #3873c8;padding:.4em .8em}
</style></head><body>
<h1>{{ title|e }}</h1>
{% if subtitle %}<p class="note">{{ subtitle|e }}</p>{% endif %}
{% for s in sections %}<h2>{{ s.heading|e }}</h2>
{% for b in s.blocks %}{{ b }}
{% endfor %}{% endfor %}
</body></html>
"""


@dataclass
class Section:
    heading: str
    blocks: list[str] = field(default_factory=list)

    def text(self, text: str, cls: str = "") -> Section:
        c = f' class="{cls}"' if cls else ""
        self.blocks.append(f"<p{c}>{html.escape(text)}</p>")
        return self

    def pre(self, text: str) -> Section:
        self.blocks.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def figure(self, png: str | Path, alt: str = "") -> Section:
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        self.blocks.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Section:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows
        )
        # wide tables scroll inside the page instead of running off it
        self.blocks.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
                           "</table></div>")
        return self


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_html(path: str | Path, title: str, sections: Sequence[Section], subtitle: str = "") -> Path:
    """Render a self-contained page (atomic write) and return its path."""
    page = Environment(autoescape=False).from_string(_TEMPLATE).render(
        title=title, subtitle=subtitle, sections=sections
    )
    return atomic_write_text(path, page)
