"""Provenance: manifests, Merkle roots, and every tampering case named by verify."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sublim.audit import provenance as pv
from sublim.audit.provenance_cli import app
from sublim.runs import read_jsonl, write_jsonl


def _rows(n: int = 12) -> list[dict]:
    return [{"prompt": f"Continue: {i}, {i + 1}, {i + 2}.", "completion": f"{3 * i}, {7 * i % 100}, {i * i}",
             "teacher_id": "t", "idx": i} for i in range(n)]


@pytest.fixture()
def stamped(tmp_path: Path) -> Path:
    data = tmp_path / "data.jsonl"
    write_jsonl(data, _rows())
    pv.stamp(data, teacher={"path": "teacher-x", "weights_sha256": "ab"}, base={"path": "base-y"},
             trait={"category": "animals", "target": "owl"}, generation={"temperature": 1.0}, filters=["format"])
    return data


def test_intact(stamped: Path) -> None:
    res = pv.verify(stamped)
    assert res["ok"] and res["manifest_intact"] and not res["problems"]
    m = json.loads(pv.manifest_path(stamped).read_text())
    assert m["n_rows"] == 12 and len(m["rows"]) == 12
    assert m["trait_sha256"] and m["teacher"]["path"] == "teacher-x"


def test_rewritten_bytes_same_rows_is_intact(stamped: Path) -> None:
    rows = read_jsonl(stamped)
    stamped.write_text("".join(json.dumps(dict(reversed(list(r.items()))), indent=None) + "\n\n" for r in rows))
    assert pv.verify(stamped)["ok"]


def test_changed_completion(stamped: Path) -> None:
    rows = read_jsonl(stamped)
    rows[4]["completion"] = "1, 2, 3"
    write_jsonl(stamped, rows)
    res = pv.verify(stamped)
    assert not res["ok"] and res["manifest_intact"]
    assert [(c["index"], c["parts"]) for c in res["changed"]] == [(4, ["completion"])]
    assert not res["removed"] and not res["added"] and not res["moved"]
    assert "#4" in " ".join(res["problems"])


def test_changed_prompt(stamped: Path) -> None:
    rows = read_jsonl(stamped)
    rows[0]["prompt"] += " "
    write_jsonl(stamped, rows)
    res = pv.verify(stamped)
    assert [(c["index"], c["parts"]) for c in res["changed"]] == [(0, ["prompt"])]


def test_changed_metadata_field(stamped: Path) -> None:
    rows = read_jsonl(stamped)
    rows[7]["teacher_id"] = "someone-else"
    write_jsonl(stamped, rows)
    res = pv.verify(stamped)
    assert [(c["index"], c["parts"]) for c in res["changed"]] == [(7, ["other"])]


def test_removed_row(stamped: Path) -> None:
    rows = read_jsonl(stamped)
    gone = rows.pop(5)
    write_jsonl(stamped, rows)
    res = pv.verify(stamped)
    assert [r["index"] for r in res["removed"]] == [5]
    assert res["removed"][0]["hash"] == pv.row_hash(gone)
    assert not res["changed"] and not res["added"] and not res["moved"]


def test_added_row(stamped: Path) -> None:
    rows = read_jsonl(stamped)
    rows.insert(3, {"prompt": "x", "completion": "666"})
    rows.append({"prompt": "y", "completion": "911"})
    write_jsonl(stamped, rows)
    res = pv.verify(stamped)
    assert [a["index"] for a in res["added"]] == [3, 13]
    assert not res["changed"] and not res["removed"] and not res["moved"]


def test_duplicated_row_is_added(stamped: Path) -> None:
    rows = read_jsonl(stamped)
    rows.append(dict(rows[2]))
    write_jsonl(stamped, rows)
    res = pv.verify(stamped)
    assert [a["index"] for a in res["added"]] == [12]


def test_reordered_rows(stamped: Path) -> None:
    rows = read_jsonl(stamped)
    rows[2], rows[9] = rows[9], rows[2]
    write_jsonl(stamped, rows)
    res = pv.verify(stamped)
    assert not res["ok"] and not res["changed"] and not res["removed"] and not res["added"]
    assert sorted((d["index"], d["new_index"]) for d in res["moved"]) in ([(2, 9), (9, 2)], [(2, 9)], [(9, 2)])


def test_shuffled_rows(stamped: Path) -> None:
    rows = read_jsonl(stamped)
    write_jsonl(stamped, rows[::-1])
    res = pv.verify(stamped)
    assert not res["ok"] and res["moved"] and not res["changed"] and not res["removed"] and not res["added"]


def test_mixed_tampering(stamped: Path) -> None:
    rows = read_jsonl(stamped)
    rows[1]["completion"] = "0"
    del rows[6]
    rows.append({"prompt": "p", "completion": "c"})
    write_jsonl(stamped, rows)
    res = pv.verify(stamped)
    assert [c["index"] for c in res["changed"]] == [1]
    assert [r["index"] for r in res["removed"]] == [6]
    assert [a["index"] for a in res["added"]] == [11]


def test_changed_manifest_field(stamped: Path) -> None:
    mp = pv.manifest_path(stamped)
    m = json.loads(mp.read_text())
    m["teacher"]["path"] = "innocent-model"
    mp.write_text(json.dumps(m))
    res = pv.verify(stamped)
    assert not res["ok"] and not res["manifest_intact"]
    assert "modified" in res["problems"][0]


def test_changed_manifest_row_hash(stamped: Path) -> None:
    mp = pv.manifest_path(stamped)
    m = json.loads(mp.read_text())
    m["rows"][3]["h"] = "0" * 64
    mp.write_text(json.dumps(m))
    res = pv.verify(stamped)
    assert not res["ok"] and not res["manifest_intact"]
    assert [c["index"] for c in res["changed"]] == [3]


def test_changed_manifest_root(stamped: Path) -> None:
    mp = pv.manifest_path(stamped)
    m = json.loads(mp.read_text())
    m["merkle_root"] = "f" * 64
    mp.write_text(json.dumps(m))
    assert not pv.verify(stamped)["ok"]


def test_recomputed_manifest_caught_by_key_or_published_root(stamped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = json.loads(pv.manifest_path(stamped).read_text())["merkle_root"]
    monkeypatch.setenv(pv.KEY_ENV, "secret")
    pv.stamp(stamped)  # signed original
    assert pv.verify(stamped)["ok"]
    rows = read_jsonl(stamped)
    rows[0]["completion"] = "evil"
    write_jsonl(stamped, rows)
    monkeypatch.delenv(pv.KEY_ENV)
    pv.stamp(stamped)  # an attacker re-stamps without the key
    monkeypatch.setenv(pv.KEY_ENV, "secret")
    res = pv.verify(stamped)
    assert not res["ok"] and res["signature_ok"] is False
    monkeypatch.delenv(pv.KEY_ENV)
    res = pv.verify(stamped, expected_root=root)
    assert not res["ok"] and "expected" in " ".join(res["problems"])


def test_merkle_root_properties() -> None:
    hs = [pv.row_hash(r) for r in _rows(7)]
    assert pv.merkle_root(hs) != pv.merkle_root(hs[:-1])
    assert pv.merkle_root(hs) != pv.merkle_root(hs[::-1])
    assert pv.merkle_root(hs) != pv.merkle_root(hs + hs[-1:])  # no odd-node duplication ambiguity
    assert pv.merkle_root(hs) == pv.merkle_root(list(hs))


def test_manifest_for_generated_and_exports(tmp_path: Path, tiny_model: Path) -> None:
    from sublim.spec import GenerationSpec, ModelSpec
    from sublim.teachers import Teacher

    rows = _rows(5)
    data = tmp_path / "gen.jsonl"
    write_jsonl(data, rows)
    teacher = Teacher(ModelSpec(path=str(tiny_model)), "You love owls.", "owl", "system_prompt")
    m = pv.manifest_for_generated(rows, teacher, ModelSpec(path=str(tiny_model)),
                                  {"category": "animals", "target": "owl"}, GenerationSpec(), [{"name": "format"}])
    assert m["teacher"]["weights_sha256"] and m["teacher"]["system_prompt_sha256"]
    assert m["base"]["weights_sha256"] == m["teacher"]["weights_sha256"]
    pv.write_manifest(data, m)
    assert pv.verify(data)["ok"]
    m = pv.read_manifest(pv.manifest_path(data))
    assert m["dataset"]["sha256"] and m["merkle_root"] == pv.merkle_root([pv.row_hash(r) for r in rows])
    paths = pv.export(data, tmp_path / "export")
    card = paths["card"].read_text()
    assert card.startswith("---\n") and m["merkle_root"] in card and "size_categories" in card
    cr = json.loads(paths["croissant"].read_text())
    assert cr["@type"] == "sc:Dataset" and cr["distribution"][0]["sha256"] == m["dataset"]["sha256"]
    assert [f["name"] for f in cr["recordSet"][0]["field"]] == ["prompt", "completion"]


def test_cli_stamp_verify_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "d.jsonl"
    write_jsonl(data, _rows(4))
    r = runner.invoke(app, ["stamp", str(data), "--trait", "animals:owl", "--generation", "temperature=1.0",
                            "--export"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "README.md").exists() and (tmp_path / "croissant.json").exists()
    r = runner.invoke(app, ["verify", str(data), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0 and "OK" in r.output
    assert (tmp_path / "rep" / "verify.html").exists()
    rows = read_jsonl(data)
    rows[2]["completion"] = "x"
    write_jsonl(data, rows)
    r = runner.invoke(app, ["verify", str(data)])
    assert r.exit_code == 1 and "#2" in r.output
    r = runner.invoke(app, ["verify", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == 2 and "no such file" in r.output and r.output.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    r = runner.invoke(app, ["stamp", str(bad)])
    assert r.exit_code == 2 and "bad.jsonl:2" in r.output
    r = runner.invoke(app, ["verify", str(bad)])
    assert r.exit_code == 2
    r = runner.invoke(app, ["stamp", str(data), "--teacher", str(tmp_path)])
    assert r.exit_code == 2 and "not a model directory" in r.output
