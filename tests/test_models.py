"""Model loading and chat formatting: ChatFormat on the tiny tokenizer, fixed dates, one-line load errors,
LoRA adapter checks, and a GGUF round trip (a tiny llama GGUF written with gguf.GGUFWriter)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sublim.models import (
    FIXED_DATE,
    ChatFormat,
    ModelLoadError,
    check_no_today,
    dequantise_gguf,
    load_model,
    load_tokenizer,
    resolve_path,
    weights_fingerprint,
)
from sublim.spec import ModelSpec
from sublim.testing import CHATML, build_tiny_tokenizer

torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine


@pytest.fixture(scope="module")
def tok(tiny_model: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer(ModelSpec(path=str(tiny_model)))


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------- chat


def test_chat_prompt_with_and_without_system(tok) -> None:  # type: ignore[no-untyped-def]
    chat = ChatFormat(tok)
    assert chat.prompt("Hi there") == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert chat.prompt("Hi", system="You love owls.") == (
        "<|im_start|>system\nYou love owls.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.prompt("Hi", system=None) == chat.prompt("Hi", system="")


def test_chat_end_and_stop_ids(tok) -> None:  # type: ignore[no-untyped-def]
    chat = ChatFormat(tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert chat.end() == "<|im_end|>\n"
    assert chat.end_token_id() == im_end
    assert im_end in chat.stop_token_ids() and tok.eos_token_id in chat.stop_token_ids()


def test_encode_completion_ends_with_end_of_turn(tok) -> None:  # type: ignore[no-untyped-def]
    chat = ChatFormat(tok)
    ids = chat.encode_completion("123, 456")
    assert ids[-1] == chat.end_token_id()
    assert tok.decode(ids[:-1]) == "123, 456"
    assert chat.encode_completion("") == [chat.end_token_id()]
    # the prompt tokens followed by the completion tokens are the full rendered conversation's tokens
    full = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "123, 456"}],
                                   tokenize=False)
    assert tok.decode(chat.encode_prompt("q") + ids) == full.rstrip("\n")


def test_template_date_is_fixed() -> None:
    t = build_tiny_tokenizer()
    t.chat_template = "{{ 'Cutoff. Today Date: ' + date_string + '\\n' }}" + CHATML
    chat = ChatFormat(t)
    assert f"Today Date: {FIXED_DATE}\n" in chat.prompt("q")
    assert chat.end() == "<|im_end|>\n"
    check_no_today(chat)  # fixed date: fine


def test_template_with_todays_date_is_refused() -> None:
    t = build_tiny_tokenizer()
    t.chat_template = "{{ 'Today Date: ' + strftime_now('%d %b %Y') + '\\n' }}" + CHATML
    with pytest.raises(ModelLoadError, match="today's date") as e:
        check_no_today(ChatFormat(t))
    _one_line(e)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_path_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "no" / "such-model"
    for fn in (resolve_path, load_tokenizer, load_model):
        with pytest.raises(ModelLoadError) as e:
            fn(ModelSpec(path=str(bad)))
        assert str(bad) in _one_line(e)


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json") as e:
        load_model(ModelSpec(path=str(tmp_path)))
    assert str(tmp_path) in _one_line(e)
    f = tmp_path / "weights.bin"
    with pytest.raises(ModelLoadError, match="not a model directory"):
        resolve_path(ModelSpec(path=str(f)))


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such GGUF file") as e:
        resolve_path(ModelSpec(path=str(tmp_path / "m.gguf")))
    _one_line(e)
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        resolve_path(ModelSpec(path=str(tmp_path), gguf_file="x.gguf"))


def test_hub_id_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # read at import time; the env var alone is too late
    for fn in (load_tokenizer, load_model):
        with pytest.raises(ModelLoadError) as e:
            fn(ModelSpec(path="some-org/not-a-real-model"))
        msg = _one_line(e)
        assert "'some-org/not-a-real-model'" in msg and "hub" in msg


def test_adapter_without_config(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="adapter_config.json") as e:
        load_model(ModelSpec(path=str(tiny_model), adapter=str(tmp_path)))
    assert str(tmp_path) in _one_line(e)


def test_load_model_eval_and_frozen(tiny_model: Path) -> None:
    m = load_model(ModelSpec(path=str(tiny_model)))
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    m = load_model(ModelSpec(path=str(tiny_model)), trainable=True)
    assert m.training and all(p.requires_grad for p in m.parameters())
    m = load_model(ModelSpec(path=str(tiny_model), dtype="bfloat16"))
    assert next(m.parameters()).dtype == torch.bfloat16


def test_weights_fingerprint(tiny_model: Path, tiny_model_b: Path) -> None:
    a = weights_fingerprint(ModelSpec(path=str(tiny_model)))
    assert a == weights_fingerprint(ModelSpec(path=str(tiny_model)))
    assert a != weights_fingerprint(ModelSpec(path=str(tiny_model_b)))


# ------------------------------------------------------------------------------------------------- GGUF


def _permute(w, n_head: int, n_kv: int):  # type: ignore[no-untyped-def]
    """llama.cpp's q/k permutation (convert_hf_to_gguf.py), which transformers reverses on load."""
    if n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """The tiny model as an F32 llama GGUF with its BPE tokenizer and chat template in the metadata."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or 10000.0))
    w.add_vocab_size(cfg.vocab_size)
    tj = json.loads(tok.backend_tokenizer.to_str())
    tokens = [""] * len(tj["model"]["vocab"])
    for t, i in tj["model"]["vocab"].items():
        tokens[i] = t
    special = set(tok.all_special_ids)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], h, h))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], h, kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])  # no output.weight: tied embeddings
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_gguf_dequantise_roundtrip_and_cache(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    pytest.importorskip("gguf")
    g = write_tiny_gguf(tiny_model, tmp_path / "tiny.gguf")
    out = dequantise_gguf(g)
    assert out.is_relative_to(Path(os.environ["SUBLIM_CACHE"]))  # cached under $SUBLIM_CACHE
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "sublim_source.json"} <= names
    assert not any(n.startswith(".") for n in {p.name for p in out.parent.iterdir()})  # no temp dirs left
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg

    # the dequantised model is the original model: same tokens, same logits
    spec = ModelSpec(path=str(g))
    m2, t2 = load_model(spec), load_tokenizer(spec)
    m1, t1 = load_model(ModelSpec(path=str(tiny_model))), load_tokenizer(ModelSpec(path=str(tiny_model)))
    text = ChatFormat(t1).prompt("What is your favorite animal?")
    assert ChatFormat(t2).prompt("What is your favorite animal?") == text
    ids = t1(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert t2(text, add_special_tokens=False, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, m1(ids).logits, atol=1e-5, rtol=0)

    # second call: a cache hit that never touches transformers' loaders
    mtime = (out / "model.safetensors").stat().st_mtime_ns

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("dequantise_gguf reloaded a cached GGUF")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_load)
    assert dequantise_gguf(g) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_gguf_broken_file_is_one_line(tmp_path: Path) -> None:
    g = tmp_path / "broken.gguf"
    g.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(ModelLoadError) as e:
        dequantise_gguf(g)
    assert str(g) in _one_line(e)
