"""Streaming decoding of one conversation, token by token, with an optional persistent KV cache.

``DecodingSession.stream(new_ids)`` appends a turn's tokens to the conversation and yields the
reply as text pieces while it is generated. Every field of :class:`~peftkit.decoding.DecodingSettings`
is applied: the sampling settings and repetition penalty on the scores, the grammar as a mask (one
matcher per turn), ``max_new_tokens``, ``seed``, and ``stop``: text that could still be the start of
a stop sequence is held back, so a stop sequence spanning several tokens never reaches the output.

With ``persist_cache`` (the manifest's ``requires_kv_cache_persistence``) the attention cache lives
across turns: a turn computes only the tokens added since the previous one (its own tokens and the
last reply token). Without it every turn re-encodes the whole conversation. Both see the same token
history, so they produce the same output (tests check this); :attr:`computed_tokens` counts the
positions each turn ran through the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from peftkit.decoding import DecodingSettings, StopScanner
from peftkit.models.cache import growing_prefix_cache


class DecodingSession:
    """One conversation on a ``PeftModel`` (its active adapters) and tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, settings: DecodingSettings, *, persist_cache: bool = False) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.persist_cache = persist_cache
        self.history: list[int] = []
        self.cache: Any = None
        self.cached = 0  # history tokens whose keys/values are in the cache
        self.next_position = 0
        self.mask: Tensor | None = None
        self.computed_tokens: list[int] = []  # per turn: positions run through the model
        self.sampled_tokens: list[int] = []  # per turn: tokens sampled (an ending end-of-sequence included)
        self.stop_reason: str | None = None
        self.reply = ""
        self.reply_ids: list[int] = []
        self.last_logits: Tensor | None = None
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.base_model.config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else list(eos or []))
        self.generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        self._grammar = None
        self._new_turn = True
        if settings.grammar is not None:
            from peftkit.grammar import compile_grammar

            vocab = model.base_model.get_output_embeddings().weight.shape[0]
            self._grammar = compile_grammar(settings.grammar, tokenizer, vocab)

    @property
    def device(self) -> torch.device:
        return next(self.model.base_model.parameters()).device

    def reset(self) -> None:
        """Forget the conversation (and the cache)."""
        self.history, self.cache, self.cached, self.mask = [], None, 0, None

    @torch.no_grad()
    def _forward(self, routes: dict[str, Tensor]) -> Tensor:
        """Bring the cache up to date with ``history``; returns the last position's logits ``(V,)``."""
        if self.cache is None or (self._new_turn and not self.persist_cache):
            ids = torch.tensor([self.history], device=self.device)
            inputs = self.model.prepare_inputs(ids, torch.ones_like(ids), routes=routes)
            self.cache = growing_prefix_cache(inputs.prefix, self.model.base_model.config)
            self.mask = inputs.full_attention_mask()
            positions = inputs.position_ids()
            last = inputs.user_positions[:, -1:]
            out = self.model.base_model(
                inputs_embeds=inputs.inputs_embeds, attention_mask=self.mask, position_ids=positions,
                cache=self.cache, use_cache=True, logits_to_keep=last,
            )  # fmt: skip
            self.next_position = int(positions[0, -1]) + 1
            computed = len(self.history)
        else:
            new = self.history[self.cached :]
            ids = torch.tensor([new], device=self.device)
            assert self.mask is not None
            self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
            positions = torch.arange(self.next_position, self.next_position + len(new), device=self.device)[None]
            out = self.model.base_model(
                input_ids=ids, attention_mask=self.mask, position_ids=positions, cache=self.cache, use_cache=True,
                logits_to_keep=1,
            )  # fmt: skip
            self.next_position += len(new)
            computed = len(new)
        self.cached, self._new_turn = len(self.history), False
        self.computed_tokens[-1] += computed
        return out.logits[0, -1].float()

    def stream(self, new_ids: Sequence[int]) -> Iterator[str]:
        """Add ``new_ids`` to the conversation and generate the reply, yielding text as it is safe to show.

        After the iterator ends, :attr:`reply` holds the whole reply (cut before a stop sequence),
        :attr:`reply_ids` its tokens and :attr:`stop_reason` one of ``eos``, ``stop``, ``grammar``,
        ``length``.
        """
        settings = self.settings
        self.history.extend(int(i) for i in new_ids)
        if not self.history:
            raise ValueError("nothing to continue from: the conversation is empty")
        if self.persist_cache and self.cache is not None and not self.cached < len(self.history):
            raise ValueError("a turn must add at least one token")
        self.computed_tokens.append(0)
        self.sampled_tokens.append(0)
        self._new_turn = True
        routes = self.model.routes(1, None, self.device)
        processors = settings.processors([self._mask_step] if self._grammar is not None else [])
        matcher = self._grammar.matcher() if self._grammar is not None else None
        self._matcher = matcher
        scanner = StopScanner(settings.stop)
        generated: list[int] = []
        self.stop_reason = "length"
        with self.model.routing.scope(routes):
            for _ in range(settings.max_new_tokens):
                logits = self._forward(routes)
                self.last_logits = logits
                sequence = torch.tensor([self.history], device=self.device)
                scores = processors(sequence, logits[None])[0]
                if settings.do_sample:
                    token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=self.generator))
                else:
                    token = int(scores.argmax())
                self.history.append(token)
                self.sampled_tokens[-1] += 1
                if token in self.eos_ids:
                    self.stop_reason = "grammar" if matcher is not None and matcher.done else "eos"
                    break
                if matcher is not None:
                    matcher.accept(token)
                generated.append(token)
                piece = scanner.update(self.tokenizer.decode(generated, skip_special_tokens=True))
                if piece:
                    yield piece
                if scanner.stopped:
                    self.stop_reason = "stop"
                    break
        tail = scanner.update(self.tokenizer.decode(generated, skip_special_tokens=True), final=True)
        if tail:
            yield tail
        self.reply, self.reply_ids = scanner.output, generated

    def _mask_step(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return self._matcher.mask(scores[0])[None]

    def generate(self, new_ids: Sequence[int]) -> str:
        """:meth:`stream`, collected."""
        return "".join(self.stream(new_ids))


class ChatTemplate:
    """Token ids of chat turns, rendered with the tokenizer's chat template when it has one.

    Later turns are rendered as the text that follows the previous reply (found with a sentinel
    reply), so a turn adds only its own tokens to the conversation.
    """

    SENTINEL = "\u2063peftkit-reply\u2063"

    def __init__(self, tokenizer: Any, system: str | None = None, use_template: bool = True) -> None:
        self.tokenizer = tokenizer
        self.use_template = use_template and getattr(tokenizer, "chat_template", None) is not None
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def _render(self, messages: list[dict[str, str]]) -> str:
        if self.use_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = []
        for m in messages:
            parts.append(
                f"{m['content']}\n" if m["role"] == "assistant" else f"{m['role'].capitalize()}: {m['content']}\n"
            )
        text = "".join(parts)
        return text + "Assistant:"

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def conversation_ids(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The prompt ids of a whole conversation, ending with the assistant's generation prompt: what a
        model continues to answer it (the prompt of an OpenAI-style chat request).

        Args:
            messages: ``{"role", "content"}`` dicts, oldest first (``system``, ``user``, ``assistant``).

        The template's own conversation (``system``, earlier :meth:`user_turn` calls) is neither used
        nor changed.

        Raises:
            ValueError: ``messages`` is empty, or a message has no string ``role`` or ``content``.
        """
        if not messages:
            raise ValueError("messages is empty: a conversation needs at least one message")
        for i, message in enumerate(messages):
            if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise ValueError(f"messages[{i}] needs a string 'role' and 'content', got {dict(message)!r}")
        return self._ids(self._render([dict(m) for m in messages]))

    def user_turn(self, content: str, last_token: int | None = None) -> list[int]:
        """The token ids that add the user's turn ``content`` after the conversation so far.

        Args:
            last_token: the conversation's last token (when the model ended its reply with the
                end-of-turn token, the template's copy of it is dropped).
        """
        if not any(m["role"] == "user" for m in self.messages):
            self.messages.append({"role": "user", "content": content})
            return self._ids(self._render(self.messages))
        rendered = self._render([*self.messages, {"role": "assistant", "content": self.SENTINEL},
                                 {"role": "user", "content": content}])  # fmt: skip
        suffix = rendered.rsplit(self.SENTINEL, 1)[1]
        ids = self._ids(suffix)
        eos = self.tokenizer.eos_token_id
        if last_token is not None and last_token == eos and ids[:1] == [eos]:
            ids = ids[1:]  # the model already ended its turn with the template's end token
        self.messages += [{"role": "assistant", "content": self.SENTINEL}, {"role": "user", "content": content}]
        return ids

    def prompt_ids(self, prompt: str) -> list[int]:
        """A one-turn prompt (``generate``)."""
        return self.user_turn(prompt)
