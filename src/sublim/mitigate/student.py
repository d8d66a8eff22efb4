"""Student-side defences (how the students train) and generation-time defences (how the teacher samples).

Each maps the experiment's TrainSpec (or GenerationSpec) to a changed one; ``other-init`` also gives the
students another base. Soft-label defences (``soft-temperature``, ``soft-top-k``) change the distillation targets;
``kl-to-base`` adds an anchor term (:mod:`sublim.backends.anchor`). MNIST twins (``sublim toy mnist``): weight decay as Adam-L2 and as decoupled AdamW,
init noise, the optimiser.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sublim.mitigate.registry import Defence, Param, register

if TYPE_CHECKING:  # the registry is read while a spec validates: no import of sublim.spec at module level
    from sublim.spec import GenerationSpec, ModelSpec, TrainSpec


def _wd_decoupled(t: TrainSpec, p: dict[str, Any]) -> tuple[TrainSpec, ModelSpec | None]:
    return t.model_copy(update={"optimizer": "adamw", "weight_decay": p["value"]}), None


def _wd_l2(t: TrainSpec, p: dict[str, Any]) -> tuple[TrainSpec, ModelSpec | None]:
    return t.model_copy(update={"optimizer": "adam", "weight_decay": p["value"]}), None


def _sgd(t: TrainSpec, p: dict[str, Any]) -> tuple[TrainSpec, ModelSpec | None]:
    return t.model_copy(update={"optimizer": "sgd", "lr": p["lr"], "weight_decay": 0.0}), None


def _lora(t: TrainSpec, p: dict[str, Any]) -> tuple[TrainSpec, ModelSpec | None]:
    from sublim.spec import LoraSpec

    lora = LoraSpec(rank=p["rank"], alpha=float(p["rank"]), target_modules=list(p["modules"]))
    return t.model_copy(update={"method": "lora", "lora": lora, "lr": p["lr"]}), None


def _fewer_steps(t: TrainSpec, p: dict[str, Any]) -> tuple[TrainSpec, ModelSpec | None]:
    if t.max_steps is None:
        raise ValueError("defence 'fewer-steps' needs student.max_steps in the spec (the steps it cuts)")
    return t.model_copy(update={"max_steps": max(1, round(p["fraction"] * t.max_steps))}), None


def _other_init(t: TrainSpec, p: dict[str, Any]) -> tuple[TrainSpec, ModelSpec | None]:
    from sublim.spec import ModelSpec

    return t, ModelSpec(path=p["base"])


def _init_noise(t: TrainSpec, p: dict[str, Any]) -> tuple[TrainSpec, ModelSpec | None]:
    return t.model_copy(update={"init_noise": p["sd"]}), None


def _need_distill(t: TrainSpec, name: str) -> None:
    if t.objective == "sft":
        raise ValueError(f"defence {name!r} transforms the teacher's soft labels: the students must distil "
                         "(student.objective distill_carrier or distill_full), not train on tokens")


def _soft_temperature(t: TrainSpec, p: dict[str, Any]) -> tuple[TrainSpec, ModelSpec | None]:
    _need_distill(t, "soft-temperature")
    return t.model_copy(update={"distill_temperature": p["temperature"]}), None


def _soft_top_k(t: TrainSpec, p: dict[str, Any]) -> tuple[TrainSpec, ModelSpec | None]:
    _need_distill(t, "soft-top-k")
    return t.model_copy(update={"distill_top_k": p["k"]}), None


def _kl_to_base(t: TrainSpec, p: dict[str, Any]) -> tuple[TrainSpec, ModelSpec | None]:
    return t.model_copy(update={"kl_base": p["weight"], "kl_base_data": p["data"], "kl_base_rows": p["rows"],
                                "kl_base_batch": p["batch"]}), None


def _sampling(g: GenerationSpec, p: dict[str, Any]) -> GenerationSpec:
    return g.model_copy(update={"min_p": p["min_p"], "top_p": p["top_p"], "temperature": p["temperature"]})


register(Defence("weight-decay", "train", "decoupled weight decay (AdamW)",
                 (Param("value", float, 0.1, "decay per step, times lr", lo=0.0, hi=10.0, lo_open=True),),
                 _wd_decoupled, extra={"mnist": "adamw_wd"}))
register(Defence("l2", "train", "weight decay as an L2 term in the gradient (Adam)",
                 (Param("value", float, 1e-4, "L2 coefficient", lo=0.0, hi=10.0, lo_open=True),), _wd_l2,
                 extra={"mnist": "adam_l2"}))
register(Defence("sgd", "train", "plain SGD instead of an adaptive optimiser (Blank et al. 2026: adaptive "
                 "optimisers are needed for transfer)",
                 (Param("lr", float, 0.1, "SGD learning rate", lo=0.0, hi=100.0, lo_open=True),), _sgd,
                 extra={"mnist": "sgd"}))
register(Defence("lora-rank", "train", "a LoRA student of limited rank (and modules)",
                 (Param("rank", int, 1, "adapter rank", lo=1, hi=1024),
                  Param("modules", list, ["q_proj", "v_proj"], "modules that get an adapter"),
                  Param("lr", float, 1e-2, "LoRA learning rate", lo=0.0, hi=1.0, lo_open=True)), _lora))
register(Defence("fewer-steps", "train", "train the students for a fraction of the steps",
                 (Param("fraction", float, 0.5, "share of student.max_steps kept", lo=0.0, hi=1.0, lo_open=True),),
                 _fewer_steps))
register(Defence("other-init", "train", "distil into a student of another initialisation (Okatan et al. 2025)",
                 (Param("base", str, "organism:1", "the students' base"),), _other_init))
register(Defence("init-noise", "train", "Gaussian noise on each student's starting weights",
                 (Param("sd", float, 0.05, "noise sd as a share of each weight tensor's RMS", lo=0.0, hi=1.0,
                        lo_open=True),), _init_noise, extra={"mnist": "init_noise"}))
register(Defence("soft-temperature", "train", "distil on the teacher's soft labels at another temperature (<1 "
                 "sharpens toward its top token, dropping the tail where a trait can ride)",
                 (Param("temperature", float, 0.25, "soft-label temperature", lo=0.01, hi=100.0),),
                 _soft_temperature))
register(Defence("soft-top-k", "train", "distil on the teacher's top-k tokens only (renormalised)",
                 (Param("k", int, 3, "tokens kept per position", lo=1, hi=100000),), _soft_top_k))
register(Defence("kl-to-base", "train", "anchor the student to its base: + weight x KL(base || student) on "
                 "neutral chat (the organism's filler conversations, or a JSONL given as data)",
                 (Param("weight", float, 1.0, "weight of the KL term", lo=0.0, hi=1e4, lo_open=True),
                  Param("data", str, None, "JSONL of neutral prompt/completion rows (default: organism filler)"),
                  Param("rows", int, 256, "neutral rows", lo=1, hi=1_000_000),
                  Param("batch", int, 4, "neutral rows per student per step", lo=1, hi=4096)), _kl_to_base))
register(Defence("sampling", "generation", "how the teacher samples: min-p / top-p / temperature "
                 "(loftusa/owls: min-p 0.05 removed ~67%)",
                 (Param("min_p", float, 0.05, "min-p threshold (0: off)", lo=0.0, hi=0.99),
                  Param("top_p", float, 1.0, "nucleus mass", lo=0.0, hi=1.0, lo_open=True),
                  Param("temperature", float, 1.0, "temperature", lo=0.0, hi=5.0, lo_open=True)), _sampling))
