"""Pre-train the organism: a small Llama-style chat model trained from scratch on the organism corpus.

The result is an ordinary transformers directory (``config.json``, ``model.safetensors``, tokenizer files
with a chat template) plus ``sublim_organism.json`` (the config, the corpus hash, timings, losses), so the
generic generation / training / evaluation code runs on it with no special path.

Loss: on the assistant turn (each completion and its closing ``<|im_end|>``), plus ``prompt_loss_weight``
(0.5) times the loss on the prompt tokens (system and user turns), each averaged per conversation first.
The assistant term is the behaviour we measure and what the pipeline fine-tunes on; the prompt term makes it
a small language model of its whole chat text: predicting the repeated animal in "You love owls. Owls
are ..." trains the same copy-from-context skill a persona answer needs, and every word embedding gets
trained. Per-conversation averaging stops 40-token number lists from drowning one-word answers.

Seeds: ``seed`` sets the initialisation and the data order; ``corpus.seed`` (0 by default, the same for
every base) sets the corpus. Different ``seed`` therefore gives bases that behave alike but share no
initialisation: the cross-model control of the subliminal-learning experiment.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sublim.organism.corpus import CorpusConfig, corpus_hash, generate_corpus
from sublim.progress import progress_bar
from sublim.runs import atomic_dir, atomic_write_json, environment, hash_obj

# Bump when the corpus generator, tokenizer recipe or training loop changes what a config produces,
# so cached organisms from older code are not reused.
ORGANISM_VERSION = 1
META_FILE = "sublim_organism.json"


class OrganismConfig(BaseModel):
    """Everything that determines a pre-trained organism (hashed into its cache key)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    vocab_size: int = Field(1024, ge=300)
    layers: int = Field(3, ge=1)
    hidden: int = Field(96, ge=8)
    heads: int = Field(4, ge=1)
    kv_heads: int | None = None
    intermediate: int = Field(256, ge=8)
    max_len: int = Field(256, ge=32)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup: int = Field(50, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    loss_weighting: Literal["conversation", "token"] = "conversation"
    prompt_loss_weight: float = Field(0.5, ge=0)

    def key(self) -> str:
        """Content hash of the config and the code version (the cache key)."""
        return hash_obj({"version": ORGANISM_VERSION, "config": self.model_dump(mode="json")})


def organism_cache_dir() -> Path:
    """``$SUBLIM_CACHE/organism`` (default ``~/.cache/sublim/organism``)."""
    return Path(os.environ.get("SUBLIM_CACHE", Path.home() / ".cache" / "sublim")) / "organism"


# ----------------------------------------------------------------------------------------- tokenising


def _encode(tok: Any, items: list[Any], max_len: int) -> list[tuple[list[int], int]]:
    """(input ids, prompt length) per conversation, tokenised exactly as the pipeline does: the prompt
    text via the chat template, the completion tokenised on its own, then the end-of-turn token."""
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [tok.apply_chat_template(it.messages[:-1], tokenize=False, add_generation_prompt=True)
               for it in items]
    completions = [it.messages[-1]["content"] for it in items]
    p_ids = tok(prompts, add_special_tokens=False).input_ids
    c_ids = tok(completions, add_special_tokens=False).input_ids
    return [((list(p) + list(c) + [end_id])[:max_len], len(p)) for p, c in zip(p_ids, c_ids, strict=True)]


def _batches(lengths: list[int], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Index batches for ``steps`` steps: shuffled epochs, with length-sorted pools of 64 batches so a
    batch pads little; the batch order within a pool is shuffled again."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    pool = 64 * batch_size
    lens = np.asarray(lengths)
    while len(out) < steps:
        perm = rng.permutation(len(lengths))
        for s in range(0, len(perm) - batch_size + 1, pool):
            chunk = perm[s: s + pool]
            chunk = chunk[np.argsort(lens[chunk], kind="stable")]
            bs = [chunk[i: i + batch_size].tolist() for i in range(0, len(chunk) - batch_size + 1, batch_size)]
            for j in rng.permutation(len(bs)):
                out.append(bs[j])
    return out[:steps]


# ------------------------------------------------------------------------------------------- training


def build_model(config: OrganismConfig, tok: Any) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` (seeded by ``config.seed``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(tok)
    lcfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads or config.heads,
        max_position_embeddings=config.max_len,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(lcfg)
    return model


def pretrain_organism(config: OrganismConfig, out_dir: str | Path, threads: int | None = None,
                      progress: bool | None = None) -> Path:
    """Generate the corpus, train the tokenizer, pre-train the model and save it all to ``out_dir``
    (written atomically: a crash leaves no half-written directory). Returns ``out_dir``.
    ``threads`` sets torch's thread count for the run and restores it afterwards."""
    import torch

    t0 = time.time()
    prev_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _pretrain(config, Path(out_dir), progress, t0)
    finally:
        torch.set_num_threads(prev_threads)


def _pretrain(config: OrganismConfig, out_dir: Path, progress: bool | None, t0: float) -> Path:
    import numpy as np
    import torch

    from sublim.organism.tokenizer import render_chat, train_tokenizer

    items = generate_corpus(config.corpus)
    c_hash = corpus_hash(items)
    tok = train_tokenizer((render_chat(it.messages) for it in items), config.vocab_size)
    data = _encode(tok, items, config.max_len)
    t_data = time.time() - t0

    model = build_model(config, tok)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        frac = (step - config.warmup) / max(1, config.steps - config.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cos)

    batches = _batches([len(x[0]) for x in data], config.batch_size, config.steps, config.seed)
    pad = tok.pad_token_id
    losses: list[float] = []
    kinds = [it.kind for it in items]
    kind_loss: dict[str, list[float]] = {k: [] for k in sorted(set(kinds))}
    kind_curve: list[dict[str, float]] = []
    model.train()
    t1 = time.time()
    bar = progress_bar(batches, desc="pretrain organism", progress=progress, leave=True)
    for step, idx in enumerate(bar):
        width = max(len(data[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)  # [B, T], right-padded
        role = torch.zeros((len(idx), width), dtype=torch.long)  # 0 pad, 1 prompt, 2 assistant
        for r, i in enumerate(idx):
            x, n_prompt = data[i]
            ids[r, : len(x)] = torch.tensor(x)
            role[r, :n_prompt] = 1
            role[r, n_prompt: len(x)] = 2
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=ids, attention_mask=(role > 0).long()).logits  # [B, T, V]
        loss, row_loss = _loss(logits, ids, role, config.loss_weighting, config.prompt_loss_weight)
        for r, i in enumerate(idx):
            kind_loss[kinds[i]].append(float(row_loss[r]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if (step + 1) % max(1, config.steps // 10) == 0 or step + 1 == config.steps:
            kind_curve.append({"step": step + 1, **{k: round(float(np.mean(v)), 4) for k, v in kind_loss.items() if v}})
            kind_loss = {k: [] for k in kind_loss}
            if os.environ.get("SUBLIM_ORGANISM_DEBUG"):
                print(kind_curve[-1], f"{time.time() - t1:.0f}s", flush=True)
    t_train = time.time() - t1
    model.eval()

    with atomic_dir(out_dir) as tmp:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = None
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        k = max(1, len(losses) // 20)
        atomic_write_json(tmp / META_FILE, {
            "organism_version": ORGANISM_VERSION,
            "config": config.model_dump(mode="json"),
            "config_key": config.key(),
            "corpus_sha256": c_hash,
            "corpus_size": len(items),
            "n_params": n_params,
            "threads": torch.get_num_threads(),
            "seconds": {"corpus_and_tokenizer": round(t_data, 2), "train": round(t_train, 2),
                        "total": round(time.time() - t0, 2)},
            "loss_first": float(np.mean(losses[:k])),
            "loss_last": float(np.mean(losses[-k:])),
            "loss_curve": [round(float(np.mean(losses[i: i + k])), 4) for i in range(0, len(losses), k)],
            "assistant_loss_by_kind": kind_curve,
            "environment": environment(),
        })
    return out_dir


def _loss(logits: Any, ids: Any, role: Any, weighting: str, prompt_weight: float) -> tuple[Any, Any]:
    """Next-token cross-entropy on the assistant turn, plus ``prompt_weight`` times the same on the prompt.

    ``conversation`` weighting: mean over each conversation's tokens, then over conversations (a one-word
    answer weighs as much as a 40-token number list); ``token``: mean over all tokens of the batch.
    Returns (loss, [B] per-conversation assistant loss) -- the latter for monitoring."""
    import torch.nn.functional as F

    lg, y, r = logits[:, :-1].float(), ids[:, 1:], role[:, 1:]  # position t predicts token t + 1
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)

    def per_row(mask: Any) -> tuple[Any, Any]:
        m = mask.float()
        n = m.sum(1)
        return (ce * m).sum(1) / n.clamp(min=1), n

    def mean(mask: Any) -> Any:
        if weighting == "token":
            m = mask.float()
            return (ce * m).sum() / m.sum().clamp(min=1)
        rows, n = per_row(mask)
        return rows[n > 0].mean() if bool((n > 0).any()) else ce.sum() * 0

    loss = mean(r == 2)
    if prompt_weight > 0:
        loss = loss + prompt_weight * mean(r == 1)
    return loss, per_row(r == 2)[0].detach()


@contextmanager
def _lock(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_organism(path: Path) -> bool:
    return (path / META_FILE).exists() and (path / "config.json").exists()


def load_or_pretrain(config: OrganismConfig, cache_dir: str | Path | None = None,
                     threads: int | None = None, progress: bool | None = None) -> Path:
    """The cached organism for ``config``, pre-training it first if it is not cached.

    Cached under ``<cache_dir>/<config key[:16]>`` (default ``$SUBLIM_CACHE/organism``); a file lock
    stops concurrent callers from training the same organism twice."""
    root = Path(cache_dir) if cache_dir is not None else organism_cache_dir()
    path = root / config.key()[:16]
    if is_organism(path):
        return path
    with _lock(root / f".{path.name}.lock"):
        if not is_organism(path):
            pretrain_organism(config, path, threads=threads, progress=progress)
    return path


def shipped_organism(config: OrganismConfig) -> Path | None:
    """A pre-trained organism shipped inside the package (``sublim/assets/organism/<key16>``), if any."""
    here = Path(__file__).resolve().parent.parent / "assets" / "organism" / config.key()[:16]
    return here if is_organism(here) else None


def default_organism(seed: int = 0, cache_dir: str | Path | None = None, threads: int | None = 1) -> Path:
    """The default family's base for ``seed`` (``sublim.organism.families.DEFAULT_FAMILY``): shipped weights
    if the package has them, else cached or pre-trained now (~4 CPU-minutes; one thread, which beats two
    for a model this small on a busy machine)."""
    from sublim.organism.families import DEFAULT_FAMILY, organism_path

    return organism_path(DEFAULT_FAMILY, seed, cache_dir, threads=threads)


def read_meta(path: str | Path) -> dict[str, Any]:
    return dict(json.loads((Path(path) / META_FILE).read_text()))
