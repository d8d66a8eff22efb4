"""Chat messages JSONL and Parquet, both ways, with provenance columns kept; errors name the file and row."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sublim.audit.common import AuditInputError, load_rows
from sublim.cli import app
from sublim.interchange import InterchangeError, from_messages, read, to_messages, write
from sublim.runs import write_jsonl

ROWS = [{"prompt": f"Continue: {i}, {i + 1}.", "completion": f"{i + 2}, {i + 3}", "content_hash": f"h{i}",
         "teacher": "owl#0" if i % 2 else None, "idx": i, "loss_mask": [1, 0, 1]} for i in range(5)]


def test_messages_round_trip_keeps_every_column(tmp_path: Path) -> None:
    p = write(ROWS, tmp_path / "chat.jsonl", "messages")
    recs = [json.loads(x) for x in p.read_text().splitlines()]
    assert recs[1]["messages"] == [{"role": "user", "content": "Continue: 1, 2."},
                                   {"role": "assistant", "content": "3, 4"}]
    assert recs[1]["teacher"] == "owl#0" and "prompt" not in recs[1]
    assert read(p) == ROWS


def test_parquet_round_trip_and_datasets_reads_it(tmp_path: Path) -> None:
    import datasets

    p = write(ROWS, tmp_path / "d.parquet")
    assert read(p) == ROWS
    ds = datasets.Dataset.from_parquet(str(p), cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 5 and set(ds.column_names) == set(ROWS[0]) and ds[3]["completion"] == "5, 6"
    assert not list(tmp_path.glob(".d.parquet.tmp*"))  # written atomically


def test_messages_from_other_tools(tmp_path: Path) -> None:
    rec = {"messages": [{"role": "system", "content": "You love owls."}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Continue: 1, 2."},
                        {"role": "assistant", "content": "3, 4"}], "source": "x"}
    assert from_messages(rec) == {"prompt": "Continue: 1, 2.", "completion": "3, 4", "source": "x",
                                  "system": "You love owls."}
    assert to_messages(from_messages(rec))["messages"][0] == {"role": "system", "content": "You love owls."}
    write_jsonl(tmp_path / "bad.jsonl", [rec, {"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(InterchangeError, match=r"bad.jsonl: row 2: .*assistant"):
        read(tmp_path / "bad.jsonl")
    with pytest.raises(AuditInputError, match="bad.jsonl: row 2"):
        load_rows(tmp_path / "bad.jsonl")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InterchangeError, match="broken.parquet: not a readable Parquet file"):
        read(tmp_path / "broken.parquet")


def test_convert_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    src = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    r = runner.invoke(app, ["convert", str(src), str(tmp_path / "out.parquet")])
    assert r.exit_code == 0 and "wrote 5 rows" in r.output
    r = runner.invoke(app, ["convert", str(tmp_path / "out.parquet"), str(tmp_path / "chat.jsonl"), "--to", "messages"])
    assert r.exit_code == 0 and read(tmp_path / "chat.jsonl") == ROWS
    for args, msg in (([str(tmp_path / "none.jsonl"), str(tmp_path / "x.jsonl")], "no such file"),
                      ([str(src), str(src)], "overwrite the input"),
                      ([str(src), str(tmp_path / "y.jsonl"), "--to", "csv"], "expected one of")):
        r = runner.invoke(app, ["convert", *args])
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and msg in lines[0], r.output
