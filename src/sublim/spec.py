"""Typed experiment and stage specs (pydantic). YAML in, fully resolved YAML out.

Everything a spec names (carrier, filters, traits, backends) is a registered name plus plain
parameters, so a spec can be saved, hashed and diffed; there is no code in configs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from sublim.spec_models import (
    CarrierSpec,
    EndpointSpec,
    FilterSpecModel,
    GenerationSpec,
    LoraSpec,
    ModelSpec,
    Objective,
    TrainSpec,
    VLLMSpec,
    _Spec,
)

__all__ = [
    "CarrierSpec", "EndpointSpec", "EvalSpec", "ExperimentSpec", "FilterSpecModel", "GenerationSpec", "LoraSpec",
    "MitigationSpec", "ModelSpec", "Objective", "SpecError", "StatsSpec", "TeacherSpec", "TrainSpec", "VLLMSpec",
    "dump_spec", "load_spec", "parse_overrides", "set_path",
]



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
    # the engine that scores (sublim.backends.engine): hf (default, in-process, the tree-attention exact scorer) or
    # vllm (exact probabilities from vLLM's prompt logprobs in a worker process, one per model; settings in `vllm`)
    backend: Literal["hf", "vllm"] | None = None
    vllm: VLLMSpec | None = None

    @model_validator(mode="after")
    def _backend(self) -> EvalSpec:
        if self.vllm is not None and self.backend != "vllm":
            raise ValueError(f"evaluation.vllm is set but the backend is {self.backend or 'hf'} (set backend: vllm)")
        return self

    def key(self) -> dict[str, Any]:
        """What a cache key holds: the settings, plus the engine and its dtype when it is not the default."""
        d = self.model_dump(exclude={"backend", "vllm"})
        if self.backend == "vllm":
            d["backend"] = {"name": "vllm", "dtype": (self.vllm or VLLMSpec()).dtype}
        return d


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
