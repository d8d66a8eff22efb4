"""Student-side defences (how the students train) and generation-time defences (how the teacher samples).

Each maps the experiment's TrainSpec (or GenerationSpec) to a changed one; ``other-init`` also gives the
students another base. MNIST twins (``sublim toy mnist``): weight decay as Adam-L2 and as decoupled AdamW,
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
register(Defence("sampling", "generation", "how the teacher samples: min-p / top-p / temperature "
                 "(loftusa/owls: min-p 0.05 removed ~67%)",
                 (Param("min_p", float, 0.05, "min-p threshold (0: off)", lo=0.0, hi=0.99),
                  Param("top_p", float, 1.0, "nucleus mass", lo=0.0, hi=1.0, lo_open=True),
                  Param("temperature", float, 1.0, "temperature", lo=0.0, hi=5.0, lo_open=True)), _sampling))
