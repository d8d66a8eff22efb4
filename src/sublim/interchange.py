"""Datasets in the formats other tools take, and back: chat ``messages`` JSONL and Parquet.

sublim's own rows are ``{"prompt", "completion", ...}`` JSONL, where ``...`` are provenance columns
(``content_hash``, ``teacher``, ``idx``, ``loss_mask``, ...). Fine-tuning services and ``trl`` take chat
``messages`` (``[{"role": "user", ...}, {"role": "assistant", ...}]``); Hugging Face ``datasets`` and most data
tools take Parquet. :func:`write` converts to either with every other column kept; :func:`read` reads any of the
three back to rows (a ``messages`` record becomes prompt = its last user turn, completion = the assistant turn
after it; a system turn is kept as ``system``), so every command that reads a dataset (audits, ``mitigate``)
accepts them. Errors name the file and the row.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

FORMATS = ("rows", "messages", "parquet")


class InterchangeError(ValueError):
    """A dataset that cannot be converted; the message names the file and row."""


def to_messages(row: dict[str, Any]) -> dict[str, Any]:
    """One row as a chat record: ``messages`` (system if the row has one, user, assistant) + its other fields."""
    msgs = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + [
        {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    return {"messages": msgs, **{k: v for k, v in row.items() if k not in ("prompt", "completion", "system")}}


def from_messages(rec: dict[str, Any], where: str = "row") -> dict[str, Any]:
    """A chat record as a row: the last user turn and the assistant turn that answers it."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                             and m.get("role") in ("system", "user", "assistant") for m in msgs):
        raise InterchangeError(f"{where}: 'messages' must be a list of {{role: system|user|assistant, content: str}}")
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if not users or users[-1] + 1 >= len(msgs) or msgs[users[-1] + 1]["role"] != "assistant":
        raise InterchangeError(f"{where}: 'messages' needs a user turn followed by an assistant turn")
    u = users[-1]
    out = {k: v for k, v in rec.items() if k != "messages"}
    system = next((m["content"] for m in msgs[:u] if m["role"] == "system"), None)
    if system is not None:
        out["system"] = system
    return {"prompt": msgs[u]["content"], "completion": msgs[u + 1]["content"], **out}


def _format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise InterchangeError(f"--to {fmt!r}: expected one of {', '.join(FORMATS)}")
        return fmt
    return "parquet" if path.suffix == ".parquet" else "rows"


def write(rows: Sequence[dict[str, Any]], path: str | Path, fmt: str | None = None) -> Path:
    """Write ``rows`` as sublim rows JSONL, chat ``messages`` JSONL or Parquet (default: by the suffix), atomically."""
    from sublim.runs import write_jsonl

    p = Path(path)
    f = _format(p, fmt)
    if f == "rows":
        return write_jsonl(p, rows)
    if f == "messages":
        return write_jsonl(p, [to_messages(r) for r in rows])
    import datasets

    from sublim.runs import atomic_file

    with atomic_file(p) as tmp:
        datasets.Dataset.from_list(list(rows)).to_parquet(str(tmp))
    return p


def read(path: str | Path) -> list[dict[str, Any]]:
    """Rows from sublim JSONL, chat ``messages`` JSONL (detected per row) or Parquet (``.parquet``)."""
    from sublim.runs import read_jsonl

    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            recs = pq.read_table(p).to_pylist()  # the file datasets.Dataset.to_parquet writes (and reads back)
        except (pyarrow.ArrowException, OSError, ValueError) as e:
            raise InterchangeError(f"{p}: not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
    else:
        recs = read_jsonl(p)
    return [from_messages(r, f"{p}: row {i}") if "messages" in r and "prompt" not in r else r
            for i, r in enumerate(recs, 1)]
