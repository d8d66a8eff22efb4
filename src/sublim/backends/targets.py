"""The teacher's side of distillation: which token columns are distilled, at which positions, and the
teacher's logits there.

A teacher's logits on a row never change during a fine-tune, so :func:`teacher_targets` computes them once
per (teacher, row) and every student that trains on the row shares them (restricted to the carrier's
tokens for ``distill_carrier``), instead of a teacher forward pass per student per step.

**Across tokenizers** (an other-family teacher, e.g. ``organism-b`` distilled into ``organism``):
``distill_carrier`` compares the two models only on the carrier's tokens (digits, separators, end of
turn), which both vocabularies hold as the same strings. :func:`teacher_tokens` pairs the student's carrier
columns with the teacher's token of the same string (end-of-turn and eos by role); :func:`encode_for_teacher`
tokenises each row with the teacher's own tokenizer and chat format and checks that the completion's tokens
are the same strings one to one in both tokenisations (ValueError naming the row otherwise), so teacher
position k and student position k predict the same text. The teacher's logits at its completion positions,
restricted to the paired columns, are then the student's targets; the KL is over the paired columns (a
carrier string only one side has as a single token is left out of both distributions; the summary records
which). ``distill_full`` and ``distill_positions: carrier`` still need one tokenizer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sublim.backends.hf import token_strings, tokens_within
from sublim.backends.train import Encoded, completion_logits, row_loss_mask
from sublim.models import ChatFormat
from sublim.progress import progress_bar

if TYPE_CHECKING:
    from sublim.backends.multi import StudentJob
    from sublim.spec import TrainSpec

# Cache the teacher's targets for a whole run when they take at most this many bytes (distill_full on a large
# vocabulary does not fit: its teacher logits are then recomputed per step).
TARGET_CACHE_BYTES = 2 * 1024**3


def same_tokenizer(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every token string to the same id (not object identity)."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def carrier_subset(chat: ChatFormat, alphabet: frozenset[str]) -> torch.Tensor:
    """The ``distill_carrier`` columns: ids of the tokens made only of ``alphabet``'s characters, and the
    stop tokens (end of turn, eos), sorted: [K]."""
    return torch.tensor(sorted(set(tokens_within(chat.tokenizer, alphabet)) | set(chat.stop_token_ids())))


def check_teacher_tokenizer(student: ChatFormat, teacher: ChatFormat, spec: TrainSpec, subset: torch.Tensor | None,
                            alphabet: frozenset[str] | None) -> TeacherTokens | None:
    """None when the teacher shares the student's tokenizer; the paired carrier columns when it has one of its
    own and the objective allows that (distill_carrier on completion positions); ValueError otherwise."""
    if same_tokenizer(student.tokenizer, teacher.tokenizer):
        return None
    if spec.objective != "distill_carrier":
        raise ValueError(f"{spec.objective} needs the teacher and student to share a tokenizer "
                         "(distill_carrier maps the carrier's tokens across tokenizers)")
    if spec.distill_positions != "completion":
        raise ValueError("distill_positions 'carrier' needs the teacher and student to share a tokenizer")
    if subset is None or alphabet is None:
        raise ValueError("distill_carrier needs the carrier's alphabet")
    return teacher_tokens(student, teacher, subset, alphabet)


@dataclass(frozen=True)
class TeacherTokens:
    """How a teacher with a tokenizer of its own reads the student's rows under ``distill_carrier``.

    ``student_cols[k]`` (student vocabulary) and ``teacher_cols[k]`` (teacher vocabulary) are the same
    token string, or the same role (end of turn, eos)."""

    chat: ChatFormat             # the teacher's chat format (its tokenizer and template)
    pad: int                     # the teacher's pad id
    student_cols: torch.Tensor   # [K]
    teacher_cols: torch.Tensor   # [K]
    student_only: tuple[str, ...] = ()  # carrier strings the teacher has no single token for (not distilled)
    teacher_only: tuple[str, ...] = ()  # and the other way round

    def describe(self) -> dict[str, Any]:
        return {"columns": len(self.student_cols), "student_only": list(self.student_only),
                "teacher_only": list(self.teacher_only)}


def teacher_tokens(student: ChatFormat, teacher: ChatFormat, subset: torch.Tensor,
                   alphabet: frozenset[str]) -> TeacherTokens:
    """Pair the student's carrier columns ``subset`` with the teacher's tokens of the same strings."""
    s_tok, t_tok = student.tokenizer, teacher.tokenizer
    s_str, t_str = token_strings(s_tok), token_strings(t_tok)
    by_role = {student.end_token_id(): teacher.end_token_id()}
    if s_tok.eos_token_id is not None and t_tok.eos_token_id is not None:
        by_role.setdefault(int(s_tok.eos_token_id), int(t_tok.eos_token_id))
    t_stops = set(teacher.stop_token_ids())
    by_string = {t_str[j]: j for j in tokens_within(t_tok, alphabet) if j not in t_stops}
    s_cols: list[int] = []
    t_cols: list[int] = []
    student_only: list[str] = []
    for i in subset.tolist():
        j = by_role[i] if i in by_role else by_string.get(s_str[i])
        if j is None:
            student_only.append(s_str[i])
        else:
            s_cols.append(i)
            t_cols.append(j)
    if len(s_cols) <= len(by_role):
        raise ValueError("distill_carrier across tokenizers: the teacher's vocabulary has none of the student's "
                         "carrier tokens")
    used = {t_str[j] for j in t_cols}
    teacher_only = sorted(s for s in by_string if s not in used)
    pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else t_tok.eos_token_id
    return TeacherTokens(teacher, int(pad), torch.tensor(s_cols), torch.tensor(t_cols), tuple(student_only),
                         tuple(teacher_only))


def encode_for_teacher(student: ChatFormat, tt: TeacherTokens, rows: Sequence[dict[str, Any]],
                       teacher_system: str | None = None) -> list[Encoded]:
    """Rows as the student reads them (``prompt``, ``completion``) and as the other-tokenizer teacher does
    (``teacher_prompt`` with its system prompt, ``teacher_completion``), in each one's chat format.
    ValueError when a completion's tokens are not the same strings one to one in both tokenisations."""
    s_str, t_str = token_strings(student.tokenizer), token_strings(tt.chat.tokenizer)
    out = []
    for i, r in enumerate(rows):
        c = student.encode_completion(r["completion"])
        tc = tt.chat.encode_completion(r["completion"])
        a, b = [s_str[t] for t in c[:-1]], [t_str[t] for t in tc[:-1]]  # the last token: end of turn, by role
        if a != b:
            raise ValueError(f"distill_carrier across tokenizers: row {i}'s completion does not tokenise to the same "
                             f"tokens for student and teacher: student {a!r}, teacher {b!r}")
        out.append(Encoded(student.encode_prompt(r["prompt"]), c, tt.chat.encode_prompt(r["prompt"], teacher_system),
                           tc, loss_mask=row_loss_mask(r, len(c), i)))
    return out


def teacher_carrier_logits(teacher: Any, batch: Sequence[Encoded], tt: TeacherTokens) -> torch.Tensor:
    """An other-tokenizer teacher's logits at the rows' completion positions on the paired carrier columns,
    in the student's column order: [sum(len(completion)), K]."""
    comps = [e.teacher_completion if e.teacher_completion is not None else e.completion for e in batch]
    return completion_logits(teacher, [e.teacher_prompt for e in batch], comps, tt.pad)[:, tt.teacher_cols]


def teacher_targets(jobs: Sequence[StudentJob], teachers: dict[str, Any], subset: torch.Tensor | None,
                    spec: TrainSpec, pad: int, autocast: Any, positions: list[list[list[int]]] | None = None,
                    cross: dict[str, TeacherTokens] | None = None,
                    progress: bool | None = None) -> list[list[torch.Tensor]] | None:
    """Per job, per row: the teacher's logits at the row's completion positions ([len(c), V'], restricted
    to ``subset`` for distill_carrier, or to the paired columns for a teacher in ``cross``, keyed by its
    spec), each computed once per distinct (teacher, prompt, completion); ``None`` for sft, or when the cache
    would exceed :data:`TARGET_CACHE_BYTES`."""
    if spec.objective == "sft":
        return None
    cross = cross or {}
    width = len(subset) if subset is not None else next(iter(teachers.values())).config.vocab_size
    toks = sum(len(e.completion) for j in jobs for e in j.encoded) if positions is None else \
        sum(len(p) for ps in positions for p in ps)
    if toks * width * 4 > TARGET_CACHE_BYTES:
        if positions is not None:
            raise ValueError("distill_positions 'carrier': the teacher's targets do not fit in memory")
        return None
    # (teacher, teacher prompt, teacher's completion tokens, distilled positions, student prompt length)
    Key = tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...], int]
    cache: dict[Key, torch.Tensor] = {}
    out: list[list[torch.Tensor]] = []
    bar = progress_bar(total=sum(len(job.encoded) for job in jobs), desc="teacher targets", unit="row",
                       progress=progress)
    for j, job in enumerate(jobs):
        assert job.teacher is not None
        tkey = job.teacher.model_dump_json()
        tt = cross.get(tkey)
        t_pad, cols = (tt.pad, tt.teacher_cols) if tt is not None else (pad, subset)
        keys: list[Key] = [(tkey, tuple(e.teacher_prompt),
                            tuple(e.teacher_completion if e.teacher_completion is not None else e.completion),
                            tuple(positions[j][i]) if positions is not None else (), len(e.prompt))
                           for i, e in enumerate(job.encoded)]
        todo = list(dict.fromkeys(k for k in keys if k not in cache))
        for i in range(0, len(todo), 64):
            chunk = todo[i: i + 64]
            with torch.no_grad(), autocast:
                if positions is None:
                    lg = completion_logits(teachers[tkey], [list(k[1]) for k in chunk], [list(k[2]) for k in chunk],
                                           t_pad).float()
                else:  # the teacher's prompt may be longer (a system prompt): align from the prompt's end
                    lg = position_logits(teachers[tkey], [list(k[1] + k[2]) for k in chunk],
                                         [[t + len(k[1]) - k[4] for t in k[3]]
                                          for k in chunk], t_pad).float()
            if cols is not None:
                lg = lg[:, cols]
            start = 0
            for k in chunk:
                n = len(k[2]) if positions is None else len(k[3])
                cache[k] = lg[start: start + n].clone()
                start += n
            bar.update(len(chunk))
        bar.update(len(keys) - len(todo))  # rows whose targets another student's rows already gave
        out.append([cache[k] for k in keys])
    bar.close()
    return out


def carrier_positions(e: Encoded, allowed: set[int]) -> list[int]:
    """Indices t into the student's sequence ``prompt + completion`` whose token is distilled under
    ``distill_positions: carrier``: every completion token, and every prompt token in ``allowed`` (the
    carrier's tokens) that lies in the part of the prompt the teacher reads too (the common suffix of the
    student's and the teacher's prompts; all of it when the teacher has no system prompt)."""
    p, tp = e.prompt, e.teacher_prompt
    common = 0
    while common < min(len(p), len(tp)) and p[-1 - common] == tp[-1 - common]:
        common += 1
    first = max(1, len(p) - common + 1)  # the token at index t is predicted from index t-1, also shared
    return [t for t in range(first, len(p)) if p[t] in allowed] + list(range(len(p), len(p) + len(e.completion)))


def left_padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, position ids) of ``seqs`` left-padded to the longest: [B, L] each."""
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, L - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, L - len(x):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def position_logits(model: Any, seqs: list[list[int]], positions: list[list[int]], pad: int) -> torch.Tensor:
    """Logits predicting ``seqs[i][t]`` for each t in ``positions[i]`` (computed at index t-1), stacked in
    order: [sum(len(positions[i])), V]. Sequences are left-padded; the LM head runs only on the columns
    from the earliest requested one."""
    ids, mask, pos = left_padded(seqs, pad)
    L = ids.shape[1]
    cols = [[L - len(x) + t - 1 for t in ts] for x, ts in zip(seqs, positions, strict=True)]
    first = min(c for cs in cols for c in cs)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=L - first).logits
    r = torch.tensor([i for i, cs in enumerate(cols) for _ in cs])
    c = torch.tensor([x - first for cs in cols for x in cs])
    return logits[r, c]
