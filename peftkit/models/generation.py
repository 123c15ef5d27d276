"""Autoregressive decoding with the KV cache, correct for every adapter and any padding.

The prompt (with its virtual tokens or key/value prefix) is encoded once; each later step feeds
only the new token with its true position. Soft prompts are injected once, in the prefill, so
greedy decoding equals the argmax of repeated full forwards (no cache), token for token. That is
the check PEFT 0.21 fails on transformers 5 (it re-injects the prompt at every step).

Each row may use its own adapter (``adapter_names``); rows finish independently at EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from peftkit.decoding import DecodingSettings
from peftkit.models.cache import growing_prefix_cache

if TYPE_CHECKING:
    from peftkit.models.peft_model import PeftModel

LogitsProcessor = Callable[[Tensor, Tensor], Tensor]

# Hugging Face generate() arguments peftkit accepts only at their default value.
_FIXED_ARGUMENTS = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "use_cache": True,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_logits": False,
}


def generate(
    model: PeftModel,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    logits_processor: Sequence[LogitsProcessor] | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    adapter_names: Sequence[str] | None = None,
    experts: Any = None,
    generation_config: Any = None,
    decoding: DecodingSettings | None = None,
    tokenizer: Any = None,
    **hf_arguments: Any,
) -> Tensor:
    """Generate continuations; returns ``(B, L + new)`` = the input ids followed by new tokens.

    Defaults come from the base model's ``generation_config`` (as in Hugging Face ``generate``).
    Rows that finish early are padded with ``pad_token_id``. Left padding is conventional, but a
    right-padded row also continues correctly (after its last real token's position).

    Args:
        logits_processor: extra ``(input_ids, scores) -> scores`` callables (e.g. a grammar).
        generator / seed: the random source for sampling, for reproducible samples.
        adapter_names: one adapter name per row (``"__base__"`` = bare model) for mixed batches.
        experts: per-row expert routes, as for ``PeftModel.forward`` (or a hierarchy's resolution).
        decoding: the settings as one :class:`~peftkit.decoding.DecodingSettings` (then the sampling
            keywords must not be given). Its ``grammar`` needs ``tokenizer``; its ``stop`` strings are
            not looked for here (the streaming decoder and evaluation cut the text at them).
    """
    for key, value in hf_arguments.items():
        if key not in _FIXED_ARGUMENTS:
            raise TypeError(f"generate() got an unexpected argument {key!r}")
        if value != _FIXED_ARGUMENTS[key]:
            raise NotImplementedError(f"{key}={value!r} is not supported (only {_FIXED_ARGUMENTS[key]!r})")
    if input_ids is None:
        raise ValueError("generate() needs input_ids")
    defaults = generation_config or model.base_model.generation_config

    def pick(value: Any, name: str, fallback: Any) -> Any:
        if value is not None:
            return value
        default = getattr(defaults, name, None)
        return fallback if default is None else default

    if decoding is not None:
        given = {k: v for k, v in {"max_new_tokens": max_new_tokens, "max_length": max_length, "do_sample": do_sample,
                 "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                 "repetition_penalty": repetition_penalty, "seed": seed}.items() if v is not None}  # fmt: skip
        if given:
            raise TypeError(f"generate(): pass decoding= or the sampling keywords, not both (got {sorted(given)})")
        settings = decoding
        seed = decoding.seed
    else:
        if max_new_tokens is None and max_length is not None:
            max_new_tokens = max_length - input_ids.shape[1]
        settings = DecodingSettings.checked(
            max_new_tokens=pick(max_new_tokens, "max_new_tokens", 20),
            temperature=pick(temperature, "temperature", 1.0),
            top_k=pick(top_k, "top_k", 0),
            top_p=pick(top_p, "top_p", 1.0),
            min_p=pick(min_p, "min_p", 0.0),
            repetition_penalty=pick(repetition_penalty, "repetition_penalty", 1.0),
        )
        if not pick(do_sample, "do_sample", False):
            settings = settings.model_copy(update={"temperature": 0.0})  # greedy
    eos = pick(eos_token_id, "eos_token_id", None)
    eos_ids = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), dtype=torch.long)
    pad = pick(pad_token_id, "pad_token_id", None)
    pad = pad if pad is not None else (int(eos_ids[0]) if eos_ids.numel() else 0)
    if generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    constraints = list(logits_processor or [])
    if settings.grammar is not None:
        if tokenizer is None:
            raise ValueError("generate(): a grammar needs tokenizer=")
        from peftkit.grammar import GrammarLogitsProcessor, compile_grammar

        vocab = model.base_model.config.vocab_size
        constraints.insert(0, GrammarLogitsProcessor(compile_grammar(settings.grammar, tokenizer, vocab)))
    processors = settings.processors(constraints)

    batch, device = input_ids.shape[0], input_ids.device
    routes = model.routes(batch, adapter_names, device, experts)
    with torch.no_grad(), model.routing.scope(routes):
        inputs = model.prepare_inputs(input_ids, attention_mask, routes=routes)
        cache = growing_prefix_cache(inputs.prefix, model.base_model.config)
        last = last_real_position(inputs.attention_mask.gather(1, inputs.user_positions), inputs.user_positions)
        out = model.base_model(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.full_attention_mask(),
            position_ids=inputs.position_ids(),
            cache=cache,
            use_cache=True,
            logits_to_keep=last.unsqueeze(1),
        )
        mask = inputs.full_attention_mask()
        position = inputs.position_ids().gather(1, last.unsqueeze(1)) + 1
        sequences = input_ids
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        eos_ids = eos_ids.to(device)
        for step in range(settings.max_new_tokens):
            scores = processors(sequences, out.logits[:, -1, :].float())
            if settings.do_sample:
                probs = torch.softmax(scores, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                token = scores.argmax(-1)
            token = torch.where(finished, torch.full_like(token, pad), token)
            sequences = torch.cat([sequences, token.unsqueeze(1)], dim=1)
            finished |= torch.isin(token, eos_ids)
            if bool(finished.all()) or step == settings.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model.base_model(
                input_ids=token.unsqueeze(1),
                attention_mask=mask,
                position_ids=position,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            position = position + 1
    return sequences


def last_real_position(user_mask: Tensor, user_positions: Tensor) -> Tensor:
    """``(B,)`` sequence position of each row's last attended user token."""
    length = user_mask.shape[1]
    index = torch.arange(length, device=user_mask.device).expand_as(user_mask)
    last_user = torch.where(user_mask.bool(), index, -1).max(dim=1).values
    if bool((last_user < 0).any()):
        raise ValueError("a row of attention_mask is all zeros: there is nothing to continue from")
    return user_positions.gather(1, last_user.unsqueeze(1)).squeeze(1)
