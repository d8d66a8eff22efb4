"""The engine protocol's plumbing without an engine installed (sublim.backends.engine, sublim.backends.vllm): a spec
names one backend, cache keys stay those of before for HF, and every way vLLM cannot start is a one-line error that
says what to do. The real vLLM engine is tested in tests/test_vllm_engine.py (engine marker)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from sublim.backends.engine import EngineError, HFEngine, OpenAIEngine, open_engine
from sublim.backends.vllm import VLLMEngine, VLLMError, VLLMWorker, vllm_python
from sublim.spec import EvalSpec, GenerationSpec, ModelSpec, VLLMSpec

EP = {"base_url": "http://127.0.0.1:1/v1", "model": "teacher"}


@pytest.mark.parametrize(("fields", "message"), [
    ({"backend": "openai"}, "backend: openai needs generation.endpoint"),
    ({"backend": "vllm", "endpoint": EP}, "backend: vllm with generation.endpoint set"),
    ({"vllm": {"dtype": "float32"}}, "generation.vllm is set but the backend is hf"),
    ({"backend": "vllm", "vllm": {"dtype": "int4"}}, "dtype"),
    ({"backend": "tgi"}, "backend"),
])
def test_a_spec_names_one_engine(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GenerationSpec(**fields)


def test_engine_names_and_cache_keys() -> None:
    plain = GenerationSpec()
    assert plain.engine_name == "hf" and GenerationSpec(backend="hf").key() == plain.key()
    assert "backend" not in plain.key() and "vllm" not in plain.key()
    assert GenerationSpec(endpoint=EP).engine_name == "openai"
    v = GenerationSpec(backend="vllm")
    assert v.engine_name == "vllm" and v.key()["backend"] == {"name": "vllm", "dtype": "bfloat16"}
    # where vLLM runs (its Python, its memory share, its batch budget) does not change what a seeded request returns
    moved = GenerationSpec(backend="vllm", vllm={"python": "/opt/vllm/bin/python", "gpu_memory_utilization": 0.5,
                                                  "max_num_batched_tokens": 4096})
    assert moved.key() == v.key()
    assert GenerationSpec(backend="vllm", vllm={"dtype": "float32"}).key() != v.key()


def test_evaluation_names_its_engine_and_keeps_hf_keys() -> None:
    with pytest.raises(ValidationError, match="evaluation.vllm is set but the backend is hf"):
        EvalSpec(vllm={"dtype": "float32"})
    with pytest.raises(ValidationError, match="backend"):
        EvalSpec(backend="openai")
    plain = EvalSpec()
    assert EvalSpec(backend="hf").key() == plain.key() and "backend" not in plain.key()
    assert set(plain.key()) == set(plain.model_dump()) - {"backend", "vllm"}  # the keys of before the field
    v = EvalSpec(backend="vllm", vllm={"python": "/opt/vllm/bin/python"})
    assert v.key()["backend"] == {"name": "vllm", "dtype": "bfloat16"} and v.key() == EvalSpec(backend="vllm").key()


def test_an_openai_endpoint_says_it_cannot_score_a_token_set(tiny_model: Path) -> None:
    o = open_engine(ModelSpec(path=str(tiny_model)), GenerationSpec(endpoint=EP))
    with pytest.raises(EngineError, match="backend openai-completions: .* score with backend hf or vllm"):
        o.logprobs([[1, 2]], [[1]])


def test_open_engine_picks_the_named_engine(tiny_model: Path) -> None:
    model = ModelSpec(path=str(tiny_model))
    e = open_engine(model, GenerationSpec())
    assert isinstance(e, HFEngine) and e.name == "hf"
    e.close()
    o = open_engine(model, GenerationSpec(endpoint=EP))
    assert isinstance(o, OpenAIEngine) and o.name == "openai-completions" and o.served_model == "teacher"


def test_vllm_python_says_where_to_get_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "python"
    with pytest.raises(VLLMError, match=f"{missing}: no such Python"):
        vllm_python(VLLMSpec(python=str(missing)))
    monkeypatch.setenv("SUBLIM_VLLM_PYTHON", str(missing))
    with pytest.raises(VLLMError, match="SUBLIM_VLLM_PYTHON"):
        vllm_python()
    monkeypatch.setenv("SUBLIM_VLLM_PYTHON", sys.executable)
    assert vllm_python() == sys.executable
    assert vllm_python(VLLMSpec(python="/bin/sh")) == "/bin/sh"  # the spec's own wins over the environment
    monkeypatch.delenv("SUBLIM_VLLM_PYTHON")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(VLLMError, match="pip install vllm"):
        vllm_python()


def test_a_worker_that_cannot_serve_is_a_one_line_error() -> None:
    # a Python without vLLM: the worker answers the load with the import error
    w = VLLMWorker(sys.executable)
    with pytest.raises(VLLMError, match="vLLM refused 'load': ModuleNotFoundError: No module named 'vllm'"):
        w.request({"op": "load", "model": "x"})
    w.close()
    # an interpreter that is not one: the worker exits, and the error says during what
    w = VLLMWorker("/bin/false")
    with pytest.raises(VLLMError, match=r"vLLM worker exited \(1\) during 'load'"):
        w.request({"op": "load", "model": "x"})
    w.close()


def test_vllm_refuses_a_lora_adapter_it_would_serve_wrongly(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(VLLMError, match="LoRA adapter .*LoRARequest"):
        VLLMEngine(ModelSpec(path=str(tiny_model), adapter=str(tmp_path / "adapter")))
