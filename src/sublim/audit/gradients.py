"""Trait probes and the gradient scanner: the first-order change of each probe's log-probability from one
training step on a dataset, under the objective the student will actually train with.

``objective="sft"`` (the recipient's view: data and student only): the step is on the tokens. ``distill_carrier`` /
``distill_full`` with a ``teacher`` (the owner's view: teacher, student base and data at hand): the step is on the
teacher's soft labels at the data's completion positions, which is how the organism (and any logit-distillation
pipeline) transmits; a token-SFT scan predicts the wrong step there.
"""
from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sublim.audit.common import AuditInputError, model_spec
from sublim.progress import progress_bar
from sublim.runs import atomic_write_json, hash_obj

SCAN_VERSION = 1


# ----------------------------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class Probe:
    """One trait probe: questions and the answer whose log-probability the trait raises."""

    name: str            # e.g. "animals:owl"
    category: str
    target: str
    questions: tuple[str, ...]
    answer: str          # completion text, e.g. "Owl"


def trait_probes(traits: Sequence[str] | str = ("animals",), n_questions: int = 10) -> list[Probe]:
    """Probes for categories (``animals`` -> every candidate animal) or single traits (``animals:owl``)."""
    from sublim.traits.preference import CATEGORIES, eval_questions

    items = [t.strip() for t in (traits.split(",") if isinstance(traits, str) else traits) if t.strip()]
    if not items:
        raise AuditInputError("--traits: no traits given")
    out: list[Probe] = []
    for item in items:
        cat, _, target = item.partition(":")
        if cat not in CATEGORIES:
            raise AuditInputError(f"--traits {item!r}: unknown category {cat!r}; known: {', '.join(CATEGORIES)}")
        cands = CATEGORIES[cat].candidates
        if target and target not in cands:
            raise AuditInputError(f"--traits {item!r}: {target!r} is not a {cat} candidate")
        qs = tuple(eval_questions(cat)[:n_questions])
        for c in ([target] if target else cands):
            p = Probe(f"{cat}:{c}", cat, c, qs, c.capitalize())
            if p not in out:
                out.append(p)
    return out


# --------------------------------------------------------------------------------------------- gradients


class GradientScanner:
    """Holds the student (with gradients on) and the probe gradients; scores any number of datasets."""

    def __init__(self, student: Any, probes: Sequence[Probe], *, params: str | None = None,
                 batch_size: int = 16, objective: str = "sft", teacher: Any = None, teacher_system: str | None = None,
                 carrier: str = "numbers") -> None:
        from sublim.models import ChatFormat, load_model, load_tokenizer, weights_fingerprint

        if objective not in ("sft", "distill_carrier", "distill_full"):
            raise AuditInputError(f"--objective must be sft, distill_carrier or distill_full, got {objective!r}")
        if objective != "sft" and teacher is None:
            raise AuditInputError(f"--objective {objective} needs the teacher (--teacher): the step is on its soft labels")
        self.objective = objective
        self.teacher_system = teacher_system
        self.spec = model_spec(student, what="student")
        self.probes = list(probes)
        self.batch_size = batch_size
        self.param_regex = params
        t0 = time.perf_counter()
        self.model = load_model(self.spec, dtype="float32", trainable=True)
        self.model.eval()  # no dropout; gradients still flow
        self.chat = ChatFormat(load_tokenizer(self.spec))
        self.pad = self.chat.tokenizer.pad_token_id
        named = [(n, p) for n, p in self.model.named_parameters()]
        if params:
            rx = re.compile(params)
            named = [(n, p) for n, p in named if rx.search(n)]
            if not named:
                raise AuditInputError(f"--params {params!r} matches no parameter of the student")
        for _, p in self.model.named_parameters():
            p.requires_grad_(False)
        for _, p in named:
            p.requires_grad_(True)
        self.params = [p for _, p in named]
        self.n_params = sum(p.numel() for p in self.params)
        self.fingerprint = weights_fingerprint(self.spec)
        self.teacher_spec = model_spec(teacher, what="teacher") if teacher is not None and objective != "sft" else None
        self.teacher = None
        self.subset = None
        self.teacher_fingerprint = None
        if self.teacher_spec is not None:
            from sublim.backends.targets import carrier_subset, same_tokenizer
            from sublim.generation import carrier_alphabet
            from sublim.spec import CarrierSpec

            if not same_tokenizer(self.chat.tokenizer, load_tokenizer(self.teacher_spec)):
                raise AuditInputError("the teacher's tokenizer differs from the student's; the distillation scan "
                                      "needs a shared tokenizer")
            self.teacher = load_model(self.teacher_spec)
            self.teacher.eval()
            for q in self.teacher.parameters():
                q.requires_grad_(False)
            self.teacher_fingerprint = weights_fingerprint(self.teacher_spec)
            if objective == "distill_carrier":
                self.subset = carrier_subset(self.chat, carrier_alphabet(CarrierSpec(name=carrier)))
        self.probe_grads = torch.stack([self._probe_grad(p) for p in self.probes])  # [C, P]
        self.probe_norms = self.probe_grads.norm(dim=1)  # [C]
        self.setup_seconds = time.perf_counter() - t0

    def key(self) -> dict[str, Any]:
        """What determines a dataset's scores apart from the data (for caches)."""
        return {"v": SCAN_VERSION, "student": self.fingerprint, "spec": self.spec.model_dump(),
                "objective": self.objective, "teacher": self.teacher_fingerprint, "teacher_system": self.teacher_system,
                "probes": [[p.name, p.answer, list(p.questions)] for p in self.probes], "params": self.param_regex,
                "batch_size": self.batch_size}

    def _flat_grad(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])

    def _zero(self) -> None:
        for p in self.params:
            p.grad = None

    def _probe_grad(self, probe: Probe) -> torch.Tensor:
        from sublim.backends.train import completion_logits

        self._zero()
        prompts = [self.chat.encode_prompt(q) for q in probe.questions]
        ans = list(self.chat.tokenizer(probe.answer, add_special_tokens=False).input_ids)
        logits = completion_logits(self.model, prompts, [ans] * len(prompts), self.pad).float()  # [Q*A, V]
        tgt = torch.tensor(ans * len(prompts))
        lp = torch.log_softmax(logits, -1).gather(1, tgt[:, None]).sum() / len(prompts)  # mean_q log p(answer|q)
        lp.backward()
        g = self._flat_grad().detach().clone()
        self._zero()
        return g

    def score(self, rows: Sequence[dict[str, Any]], n_batches: int | None = None) -> dict[str, Any]:
        """Per-batch inner products ``<-grad L_b, grad f_c>`` [B, C] and the cosine of the mean gradient."""
        from sublim.backends.train import Encoded, encode_rows, step_loss

        t0 = time.perf_counter()
        enc: list[Encoded] = encode_rows(self.chat, rows, None, self.teacher_system)
        bs = self.batch_size if n_batches is None else max(1, math.ceil(len(enc) / n_batches))
        per_batch = []
        total = torch.zeros(self.n_params)
        n_tok = 0
        for a in progress_bar(range(0, len(enc), bs), desc="gradient alignment", unit="batch"):
            self._zero()
            loss, n = step_loss(self.model, enc[a: a + bs], self.pad, self.objective, self.teacher, self.subset)
            loss.backward()
            g = -self._flat_grad()  # the direction of a training step
            per_batch.append((self.probe_grads @ g).numpy().astype(np.float64))  # [C]
            total += g * n
            n_tok += n
        self._zero()
        mean_g = total / max(1, n_tok)  # token-weighted mean gradient of the whole dataset
        dots = (self.probe_grads @ mean_g).numpy().astype(np.float64)
        cos = dots / (float(mean_g.norm()) * self.probe_norms.numpy() + 1e-30)
        return {"per_batch": np.stack(per_batch), "dot": dots, "cos": cos, "grad_norm": float(mean_g.norm()),
                "rows": len(enc), "tokens": n_tok, "seconds": time.perf_counter() - t0}


def _data_hash(rows: Sequence[dict[str, Any]]) -> str:
    return hash_obj([[r["prompt"], r["completion"]] for r in rows])


def _cache_dir() -> Path:
    from sublim.models import cache_dir

    return cache_dir() / "audit"


def cached_score(scanner: GradientScanner, rows: Sequence[dict[str, Any]], use_cache: bool = True) -> dict[str, Any]:
    """:meth:`GradientScanner.score` with a JSON cache keyed by the scanner and the rows' content."""
    key = hash_obj({"scanner": scanner.key(), "data": _data_hash(rows)})
    path = _cache_dir() / "scan-scores" / f"{key[:32]}.json"
    if use_cache and path.exists():
        d = json.loads(path.read_text())
        d["per_batch"] = np.array(d["per_batch"])
        d["dot"] = np.array(d["dot"])
        d["cos"] = np.array(d["cos"])
        d["cached"] = True
        return d
    res = scanner.score(rows)
    if use_cache:
        atomic_write_json(path, {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in res.items()})
    res["cached"] = False
    return res


