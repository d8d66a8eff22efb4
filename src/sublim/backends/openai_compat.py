"""Generation through an OpenAI-compatible endpoint (a local ``vllm serve``, a hosted service) with the
``openai`` client (``pip install 'sublim[openai]'``).

``api: completions`` (the default, for vLLM and other engines that take token prompts): every prompt is sent
as the token ids of sublim's own chat format (:class:`sublim.models.ChatFormat`), so the served teacher
sees exactly the prompt the Hugging Face backend would give it, and decoding stops at the same end-of-turn
tokens (``stop_token_ids``). ``api: chat``: the messages go to the chat API and the server's template renders
them (endpoints without a completions API); the rows record which API made them.

One request per prompt, each with its own seed (``seed`` is the request seed: the same seed gives the same
completion on an engine that honours seeds), sent ``max_concurrency`` at a time (the engine batches
concurrent requests). Sampling: temperature, top_p, and on vLLM min_p. Constrained decoding: the carrier's
grammar as a regex (:meth:`sublim.carriers.Grammar.regex`) through vLLM's structured outputs (``guided_regex``
on servers older than the ``structured_outputs`` field); an endpoint that cannot constrain refuses with a
message instead of returning unconstrained text.

The API key is read from the environment variable the spec names (``api_key_env``) when a client is made and
is never stored: not in the spec, a stage key, a row, a log or a report.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sublim.backends.hf import GenOutput

if TYPE_CHECKING:
    from sublim.models import ChatFormat
    from sublim.spec import EndpointSpec


class EndpointError(RuntimeError):
    """An endpoint that refused or failed a request; the message names the endpoint and the cause."""


def client(ep: EndpointSpec) -> Any:
    try:
        from openai import OpenAI
    except ImportError:
        raise EndpointError("the OpenAI-compatible backend needs the openai client: pip install 'sublim[openai]'") \
            from None
    key = os.environ.get(ep.api_key_env) or "EMPTY"  # a local vllm serve without --api-key takes any key
    return OpenAI(base_url=ep.base_url, api_key=key, timeout=ep.timeout_s, max_retries=ep.max_retries)


class OpenAIGenerator:
    """``generate(prompts, ...) -> [GenOutput]``, the Hugging Face backend's ``generate_batch`` contract, on an
    endpoint. ``chat`` (the teacher's own chat format) renders token prompts for ``api: completions``."""

    def __init__(self, ep: EndpointSpec, chat: ChatFormat | None = None) -> None:
        if ep.api == "completions" and chat is None:
            raise EndpointError(f"{ep.base_url}: api 'completions' sends sublim's token prompts and needs the "
                                "model's tokenizer; use api 'chat' for an endpoint whose model is not local")
        self.ep, self.chat, self.client = ep, chat, client(ep)
        self._regex_field: str | None = None  # "structured_outputs" or "guided_regex", found on first use

    # ---------------------------------------------------------------------------------------- one request
    def _extra(self, regex: str | None, min_p: float) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if min_p > 0:
            extra["min_p"] = min_p
        if self.ep.api == "completions" and self.chat is not None:
            extra["stop_token_ids"] = self.chat.stop_token_ids()
            extra["skip_special_tokens"] = True
        if regex is not None:
            if (self._regex_field or "structured_outputs") == "structured_outputs":
                extra["structured_outputs"] = {"regex": regex}
            else:
                extra["guided_regex"] = regex
        return extra

    def _request(self, prompt: str, system: str | None, seed: int, max_new_tokens: int, temperature: float,
                 top_p: float, min_p: float, regex: str | None) -> GenOutput:
        args: dict[str, Any] = {"model": self.ep.model, "max_tokens": max_new_tokens, "temperature": temperature,
                                "top_p": top_p, "seed": seed, "extra_body": self._extra(regex, min_p)}
        if self.ep.api == "completions":
            assert self.chat is not None
            r = self.client.completions.create(prompt=self.chat.encode_prompt(prompt, system), **args)
            c = r.choices[0]
            text, reason = c.text, c.finish_reason
        else:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            r = self.client.chat.completions.create(messages=msgs, **args)
            c = r.choices[0]
            text, reason = c.message.content or "", c.finish_reason
        n = int(getattr(r.usage, "completion_tokens", 0) or 0) if r.usage is not None else 0
        return GenOutput(text, n, reason == "stop")

    def _first(self, call: Any) -> GenOutput:
        """The first constrained request, which also finds the field this server constrains with."""
        from openai import BadRequestError

        try:
            out: GenOutput = call()
            self._regex_field = self._regex_field or "structured_outputs"
            return out
        except BadRequestError as e:
            if self._regex_field is not None:
                raise
            self._regex_field = "guided_regex"
            try:
                out = call()
                return out
            except BadRequestError as e2:
                raise EndpointError(f"{self.ep.base_url}: the endpoint refused regex-constrained decoding "
                                    f"({_first_line(e)}; {_first_line(e2)}); set generation.constrained: false "
                                    "to sample unconstrained") from None

    # ---------------------------------------------------------------------------------------- a batch
    def generate(self, prompts: Sequence[str], *, system: str | None = None, max_new_tokens: int = 48,
                 temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 grammars: Sequence[Any] | None = None, seeds: Sequence[int], min_p: float = 0.0) -> list[GenOutput]:
        """One completion per prompt; ``seeds[i]`` is prompt i's request seed."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        temp = 0.0 if greedy else temperature
        regexes = [g.regex() for g in grammars] if grammars is not None else [None] * len(prompts)

        def one(i: int) -> GenOutput:
            return self._request(prompts[i], system, int(seeds[i]), max_new_tokens, temp, top_p, min_p, regexes[i])

        if not prompts:
            return []
        t0 = time.perf_counter()
        try:
            first = self._first(lambda: one(0)) if regexes[0] is not None else one(0)
            with ThreadPoolExecutor(max_workers=self.ep.max_concurrency) as pool:
                rest = list(pool.map(one, range(1, len(prompts))))
        except EndpointError:
            raise
        except Exception as e:  # noqa: BLE001 - the client's errors (connection, status) become one line
            raise EndpointError(f"{self.ep.base_url}: {type(e).__name__}: {_first_line(e)}") from None
        self.seconds = time.perf_counter() - t0
        return [first, *rest]


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__
