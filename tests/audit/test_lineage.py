"""Lineage known-answer tests on tiny models: same init survives fine-tuning, LoRA merges and dtype casts;
different seeds, widths and architectures are unrelated, with the reason."""
from __future__ import annotations

import json
from pathlib import Path

from sublim.audit.lineage import declared_evidence, lineage
from sublim.spec import ModelSpec, TrainSpec


def test_base_vs_full_finetune_same_init(tiny_model: Path, full_ft: Path) -> None:
    res = lineage(str(tiny_model), str(full_ft))
    assert res.metrics["verdict"] == "same_init", res.summary
    assert res.metrics["agree_fraction"] > 0.9
    assert res.payload["declared"]["link"] == "B declares A as its base"  # from sublim_train.json


def test_base_vs_lora_merged_and_unmerged(tiny_model: Path, owl_rows: list[dict], tmp_path: Path) -> None:
    from sublim.backends.train import finetune

    spec = TrainSpec(method="lora", max_steps=15, lr=1e-2, batch_size=16, warmup_steps=0)
    finetune(ModelSpec(path=str(tiny_model)), owl_rows, spec, tmp_path / "merged", merge=True, progress=False)
    finetune(ModelSpec(path=str(tiny_model)), owl_rows, spec, tmp_path / "adapter", progress=False)
    assert lineage(str(tiny_model), str(tmp_path / "merged")).metrics["verdict"] == "same_init"
    res = lineage(str(tiny_model), str(tmp_path / "adapter"))  # an adapter dir: its base is read from it
    assert res.metrics["verdict"] == "same_init"
    assert any(d["relation"] == "base" for d in res.payload["declared"]["student"])


def test_heavy_finetune_still_same_init(tiny_model: Path, owl_rows: list[dict], tmp_path: Path) -> None:
    from sublim.backends.train import finetune

    finetune(ModelSpec(path=str(tiny_model)), owl_rows, TrainSpec(method="full", max_steps=200, lr=1e-2,
             batch_size=16, warmup_steps=0), tmp_path / "heavy", progress=False)
    res = lineage(str(tiny_model), str(tmp_path / "heavy"))
    assert res.metrics["verdict"] == "same_init", res.summary
    assert res.metrics["median_r"] < 0.9  # the weights really moved


def test_dtype_cast_same_init(full_ft: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(full_ft), dtype=torch.bfloat16)
    m.save_pretrained(tmp_path / "bf16")
    AutoTokenizer.from_pretrained(str(full_ft)).save_pretrained(tmp_path / "bf16")
    res = lineage(str(full_ft), str(tmp_path / "bf16"))
    assert res.metrics["verdict"] == "same_init"
    assert res.metrics["min_r"] > 0.99
    assert "BF16" in " ".join(res.payload["student"]["dtypes"]).upper()


def test_two_seeds_unrelated(tiny_model: Path, tiny_model_b: Path) -> None:
    res = lineage(str(tiny_model), str(tiny_model_b))
    assert res.metrics["verdict"] == "unrelated"
    assert "independently initialised" in res.payload["reason"]
    assert abs(res.metrics["combined_z"]) < 6


def test_finetune_of_other_seed_unrelated(tiny_model_b: Path, full_ft: Path) -> None:
    assert lineage(str(tiny_model_b), str(full_ft)).metrics["verdict"] == "unrelated"


def test_different_hidden_size_unrelated(tiny_model: Path, tmp_path: Path) -> None:
    from sublim.testing import build_tiny_model

    wide = build_tiny_model(tmp_path / "wide", seed=0, hidden=48)
    res = lineage(str(tiny_model), str(wide))
    assert res.metrics["verdict"] == "unrelated"
    assert "hidden_size 32 vs 48" in res.payload["reason"]


def test_different_architecture_unrelated(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sublim.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128)) \
        .save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    res = lineage(str(tiny_model), str(tmp_path / "gpt2"))
    assert res.metrics["verdict"] == "unrelated"
    assert "different architectures (llama vs gpt2)" in res.payload["reason"]


def test_declared_model_card(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "card"
    shutil.copytree(tiny_model, d)
    (d / "README.md").write_text("---\nbase_model: meta-llama/Llama-3.2-1B\n---\n# hi\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["_name_or_path"] = "org/thing"
    (d / "config.json").write_text(json.dumps(cfg))
    ev = declared_evidence(ModelSpec(path=str(d)))
    assert {"source": "model README.md base_model", "relation": "base", "value": "meta-llama/Llama-3.2-1B"} in ev
    assert any(e["value"] == "org/thing" for e in ev)


def test_report_files(tiny_model: Path, full_ft: Path, tmp_path: Path) -> None:
    res = lineage(str(tiny_model), str(full_ft))
    paths = res.write(tmp_path)
    assert "same_init" in paths["html"].read_text()
    assert json.loads(paths["json"].read_text())["verdict"] == "same_init"
