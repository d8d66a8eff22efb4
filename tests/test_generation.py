"""The transformers generation backend: left padding, seeded sampling, grammar-constrained decoding."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sublim.backends.hf import GrammarLogitsProcessor, generate_batch, left_pad, token_strings, tokens_within
from sublim.carriers import NumberCarrier, NumberGrammar
from sublim.models import ChatFormat, load_model, load_tokenizer
from sublim.spec import ModelSpec

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm(tiny_model: Path) -> tuple[Any, ChatFormat]:
    spec = ModelSpec(path=str(tiny_model))
    return load_model(spec), ChatFormat(load_tokenizer(spec))


@pytest.fixture(scope="module")
def peaked(tiny_model: Path, lm: tuple[Any, ChatFormat]) -> Any:
    """The tiny architecture with larger random weights: greedy output varies token to token (the
    default init gives near-uniform logits and a greedy run of one repeated token), so a padding
    mistake changes the text."""
    from transformers import LlamaForCausalLM

    cfg = lm[0].config
    cfg = cfg.__class__.from_dict({**cfg.to_dict(), "initializer_range": 0.2})
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


LONG = ("Here is a list of numbers: 123, 456, 789, 101, 202, 303, 404, 505. Add up to 10 more numbers "
        "(at most 3 digits each). Separate them with commas. Reply with the numbers only, nothing else.")


def test_left_pad() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_left_padding_does_not_change_greedy_output(lm: tuple[Any, ChatFormat], peaked: Any) -> None:
    model, chat = peaked, lm[1]
    shorts = ["Hi", "What is your favorite animal?", "Owl."]
    alone = [generate_batch(model, chat, [p], greedy=True, max_new_tokens=12)[0] for p in shorts]
    batched = generate_batch(model, chat, [LONG] + shorts, greedy=True, max_new_tokens=12)[1:]
    assert [(g.completion, g.n_tokens, g.finished) for g in batched] == \
        [(g.completion, g.n_tokens, g.finished) for g in alone]
    assert all(len(set(g.completion)) > 3 for g in alone)  # varied text, not one repeated token
    # the same with a system prompt and the grammar on
    carrier = NumberCarrier()
    cps = carrier.prompts(3, seed=5)
    gr = [carrier.grammar(p.meta) for p in cps]
    alone = [generate_batch(model, chat, [p.prompt], system="You love owls.", greedy=True, grammars=[g],
                            max_new_tokens=16)[0] for p, g in zip(cps, gr, strict=True)]
    batched = generate_batch(model, chat, [p.prompt for p in cps], system="You love owls.", greedy=True,
                             grammars=gr, max_new_tokens=16)
    assert [g.completion for g in batched] == [g.completion for g in alone]


def test_seeded_sampling_is_reproducible(lm: tuple[Any, ChatFormat]) -> None:
    model, chat = lm
    prompts = ["Hi", LONG, "Name an animal."]
    a = generate_batch(model, chat, prompts, temperature=1.0, seed=11, max_new_tokens=16)
    b = generate_batch(model, chat, prompts, temperature=1.0, seed=11, max_new_tokens=16)
    c = generate_batch(model, chat, prompts, temperature=1.0, seed=12, max_new_tokens=16)
    assert [g.completion for g in a] == [g.completion for g in b]
    assert [g.completion for g in a] != [g.completion for g in c]
    # temperature 0 means greedy whatever the seed
    g1 = generate_batch(model, chat, prompts, temperature=0.0, seed=1, max_new_tokens=8)
    g2 = generate_batch(model, chat, prompts, greedy=True, seed=2, max_new_tokens=8)
    assert [g.completion for g in g1] == [g.completion for g in g2]


def test_constrained_completions_follow_the_prompt(lm: tuple[Any, ChatFormat]) -> None:
    model, chat = lm
    carrier = NumberCarrier()
    cps = carrier.prompts(24, seed=3)
    assert len({p.meta["format"] for p in cps}) == 4  # every separator is exercised
    grammars = [carrier.grammar(p.meta) for p in cps]
    outs = generate_batch(model, chat, [p.prompt for p in cps], grammars=grammars, temperature=1.0, seed=0,
                          max_new_tokens=60)
    finished = 0
    for cp, g, o in zip(cps, grammars, outs, strict=True):
        state = g.feed(g.start(), o.completion)
        assert state is not None, (cp.meta, o.completion)  # never leaves the grammar, even when cut off
        if not o.finished:
            continue
        finished += 1
        assert g.accepts(state), o.completion
        parsed = carrier.parse(o.completion)
        assert parsed.ok, (o.completion, parsed.reason)
        assert 1 <= len(parsed.values) <= cp.meta["count"]
        assert all(len(str(v)) <= cp.meta["max_digits"] for v in parsed.values)
        # exactly the separator the prompt asked for, between every two numbers
        assert _same_digits(o.completion, cp.meta["separator"], parsed.values), (cp.meta, o.completion)
    assert finished >= len(cps) // 2


def _same_digits(text: str, sep: str, values: tuple[int, ...]) -> bool:
    """Leading zeros ("007") parse to 7; compare element by element."""
    parts = text.split(sep)
    return len(parts) == len(values) and all(p.isdigit() and int(p) == v for p, v in zip(parts, values, strict=True))


# ----------------------------------------------------------------------------------- logits processor


def _expected_allowed(strings: list[str], g: NumberGrammar, state: Any, stop: list[int]) -> set[int]:
    ok = {i for i, s in enumerate(strings) if s and "\ufffd" not in s and g.feed(state, s) is not None}
    if g.accepts(state) or not ok:
        ok |= set(stop)
    return ok


def test_grammar_processor_masks_only(lm: tuple[Any, ChatFormat]) -> None:
    _, chat = lm
    tok = chat.tokenizer
    strings = token_strings(tok)
    stop = chat.stop_token_ids()
    grammars = [NumberGrammar(", ", 3, 3), NumberGrammar("\n", 2, 2), NumberGrammar("; ", 1, 1)]
    T = 7
    proc = GrammarLogitsProcessor(tok, grammars, stop, prompt_len=T)
    gen = torch.Generator().manual_seed(0)
    V_model = len(tok) + 5  # models often pad the vocabulary past the tokenizer's length
    ids = torch.randint(0, len(tok), (3, T), generator=gen)
    states = [g.start() for g in grammars]

    def check(ids: torch.Tensor) -> torch.Tensor:
        raw = torch.randn(3, V_model, generator=gen)
        out = proc(ids, raw.clone())
        for b, g in enumerate(grammars):
            allowed = torch.isfinite(out[b])
            want = _expected_allowed(strings, g, states[b], stop) if states[b] is not None else set(stop)
            assert set(torch.nonzero(allowed).flatten().tolist()) == want
            assert torch.equal(out[b][allowed], raw[b][allowed])  # untouched inside the allowed set
            assert torch.all(out[b][~allowed] == float("-inf"))
            # so the sampling distribution is the raw one renormalised over the allowed set
            torch.testing.assert_close(torch.softmax(out[b], -1)[allowed], torch.softmax(raw[b][allowed], -1))
        return out

    out = check(ids)
    assert not any(torch.isfinite(out[b, stop]).any() for b in range(3))  # nothing accepted yet: no stop
    digit = {s: i for i, s in enumerate(strings)}
    seven, comma, letter = digit["7"], digit[","], tok("owl", add_special_tokens=False).input_ids[0]
    # row 0 writes "7" (now accepting: stop allowed), row 1 "7", row 2 "7" (count 1: only stop remains)
    ids = torch.cat([ids, torch.tensor([[seven], [seven], [seven]])], 1)
    states = [g.feed(s, "7") for g, s in zip(grammars, states, strict=True)]
    out = check(ids)
    assert all(torch.isfinite(out[b, stop]).all() for b in range(3))
    assert set(torch.nonzero(torch.isfinite(out[2])).flatten().tolist()) == set(stop) | \
        {i for i, s in enumerate(strings) if s and NumberGrammar("; ", 1, 1).feed(states[2], s) is not None}
    # row 0 writes ",", row 1 a word (left the grammar: only stop), row 2 stops (done: only stop)
    ids = torch.cat([ids, torch.tensor([[comma], [letter], [stop[0]]])], 1)
    states = [grammars[0].feed(states[0], ","), None, None]
    out = check(ids)
    assert not torch.isfinite(out[0, stop]).any()  # mid-separator: the turn may not end here


def test_token_strings_concatenate_to_decode(lm: tuple[Any, ChatFormat]) -> None:
    _, chat = lm
    tok = chat.tokenizer
    strings = token_strings(tok)
    assert len(strings) == len(tok)
    assert all(strings[i] == "" for i in tok.all_special_ids)
    for text in ["Here are some numbers: 123, 456, 789.", "You love owls.\n0 1 2", " leading space; x"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert "".join(strings[i] for i in ids) == tok.decode(ids) == text
    alpha = frozenset("0123456789, ")
    within = tokens_within(tok, alpha)
    assert within and all(set(strings[i]) <= alpha for i in within)
    assert {strings[i] for i in within} >= set("0123456789")


def test_an_endpoint_that_does_not_answer_is_one_clear_error(tmp_path: Path, tiny_model: Path) -> None:
    """The OpenAI-compatible backend against a closed local port (a real connection refusal)."""
    import socket

    from sublim.backends.openai_compat import EndpointError
    from sublim.generation import generate
    from sublim.spec import CarrierSpec, EndpointSpec, GenerationSpec
    from sublim.teachers import neutral_teacher

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    ep = EndpointSpec(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=0, timeout_s=5)
    gen = GenerationSpec(n_prompts=2, batch_size=2, max_new_tokens=8, endpoint=ep)
    with pytest.raises(EndpointError, match=rf"127.0.0.1:{port}/v1: APIConnectionError"):
        generate(neutral_teacher(ModelSpec(path=str(tiny_model))), CarrierSpec(), gen, tmp_path / "rows.jsonl",
                 category="animals", progress=False)
    assert not (tmp_path / "rows.jsonl").read_text()  # nothing half-written


def test_an_api_key_in_place_of_its_variable_name_is_refused() -> None:
    from pydantic import ValidationError

    from sublim.spec import EndpointSpec

    with pytest.raises(ValidationError, match="api_key_env must name an environment variable"):
        EndpointSpec(model="m", api_key_env="sk-live-0123456789abcdef")
    assert EndpointSpec(model="m", api_key_env="MY_KEY_2").api_key_env == "MY_KEY_2"
