"""Streaming decoding: KV cache across turns, stop sequences across tokens, grammars at temperature 1."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import torch

from peftkit import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model, load_base
from peftkit.decoding import DecodingSettings, Grammar
from peftkit.session import ChatTemplate, DecodingSession
from tests.evaluation.conftest import write_char_folder

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": -50, "maximum": 999},
        "tag": {"type": "string", "maxLength": 6},
        "items": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["ok", "n", "tag"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    """A tiny Llama (character tokenizer) with a soft prompt and a LoRA, both active."""
    base, tokenizer = load_base(write_char_folder(tmp_path_factory.mktemp("chars")))
    torch.manual_seed(0)
    model = get_peft_model(base, PromptTuningConfig(num_virtual_tokens=3), "prompt")
    model.add_adapter("lora", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.set_adapter(["prompt", "lora"])
    return model.eval(), tokenizer


def conversation(model, tokenizer, persist: bool, settings: DecodingSettings):
    session = DecodingSession(model, tokenizer, settings, persist_cache=persist)
    template = ChatTemplate(tokenizer)
    replies, turn_ids = [], []
    for text in ["give json", "and 2 more", "x y z 1 2", "last one"]:
        ids = template.user_turn(text, session.history[-1] if session.history else None)
        turn_ids.append(ids)
        replies.append(session.generate(ids))
    return session, replies, turn_ids


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_persistent_cache_computes_only_new_tokens_and_equals_recomputing(char_model, temperature):
    model, tokenizer = char_model
    settings = DecodingSettings(max_new_tokens=6, temperature=temperature, seed=7)
    kept, kept_replies, turns = conversation(model, tokenizer, True, settings)
    fresh, fresh_replies, _ = conversation(model, tokenizer, False, settings)
    assert kept_replies == fresh_replies
    assert kept.history == fresh.history
    torch.testing.assert_close(kept.last_logits, fresh.last_logits, rtol=1e-4, atol=1e-4)
    # turn 1 encodes its prompt; every later turn only its own tokens plus the previous reply's last
    # token (sampled but not yet fed), then one position per generated token after the first
    generated = kept.sampled_tokens
    assert kept.computed_tokens[0] == len(turns[0]) + generated[0] - 1
    for t in range(1, 4):
        assert kept.computed_tokens[t] == 1 + len(turns[t]) + generated[t] - 1
    # recomputing re-encodes the whole conversation at every turn
    assert fresh.computed_tokens[3] > 3 * kept.computed_tokens[3]


def test_stop_sequences_spanning_tokens_are_trimmed(char_model):
    model, tokenizer = char_model
    ids = tokenizer("give json")["input_ids"]
    forced = Grammar(gbnf='root ::= "abcdefgh."')  # the character tokenizer spells it one token a letter
    settings = DecodingSettings(max_new_tokens=20, grammar=forced)
    session = DecodingSession(model, tokenizer, settings.model_copy(update={"stop": ("cde",)}))
    pieces = list(session.stream(ids))
    assert "".join(pieces) == session.reply == "ab"
    assert session.stop_reason == "stop"
    assert len(session.reply_ids) == 5  # decoding ended on the stop's last token, "e"
    # a partial match ("cd" of "cdx") is held back, then released when it stops matching
    session = DecodingSession(model, tokenizer, settings.model_copy(update={"stop": ("cdx", "zz")}))
    pieces = list(session.stream(ids))
    assert session.reply == "abcdefgh." and session.stop_reason == "grammar"
    assert pieces[:3] == ["a", "b", "cde"]


def test_json_schema_output_always_parses_and_validates_at_temperature_one(char_model):
    model, tokenizer = char_model
    settings = DecodingSettings(temperature=1.0, max_new_tokens=96, seed=0, grammar=Grammar(json_schema=SCHEMA))
    session = DecodingSession(model, tokenizer, settings)
    ids = tokenizer("give json")["input_ids"]
    outputs = []
    for _ in range(120):
        session.reset()
        outputs.append(session.generate(ids))
        assert session.stop_reason == "grammar", outputs[-1]
    for output in outputs:
        jsonschema.validate(json.loads(output), SCHEMA)
    assert len(set(outputs)) > 60  # real sampling, not one memorised answer


def test_batched_generate_with_a_grammar_at_temperature_one(char_model):
    model, tokenizer = char_model
    settings = DecodingSettings(temperature=1.0, max_new_tokens=96, seed=1, grammar=Grammar(json_schema=SCHEMA))
    prompts = torch.tensor([tokenizer("give json")["input_ids"]] * 16)
    out = model.generate(input_ids=prompts, decoding=settings, tokenizer=tokenizer)
    for row in out[:, prompts.shape[1] :]:
        jsonschema.validate(json.loads(tokenizer.decode(row, skip_special_tokens=True)), SCHEMA)


def test_gbnf_grammar(char_model):
    model, tokenizer = char_model
    grammar = Grammar(gbnf='root ::= ("yes" | "no") " " [0-9] [0-9]?')
    session = DecodingSession(model, tokenizer, DecodingSettings(temperature=1.0, seed=3, grammar=grammar))
    seen = set()
    for _ in range(30):
        session.reset()
        reply = session.generate(tokenizer("x")["input_ids"])
        word, number = reply.split(" ")
        assert word in ("yes", "no") and number.isdigit() and len(number) <= 2
        seen.add(word)
    assert seen == {"yes", "no"}


def test_a_grammar_that_does_not_compile_is_an_error(char_model):
    model, tokenizer = char_model
    with pytest.raises(ValueError, match="gbnf does not compile.*missing"):
        DecodingSession(model, tokenizer, DecodingSettings(grammar=Grammar(gbnf="root ::= missing")))


@pytest.mark.smollm2
def test_json_schema_on_smollm2_at_temperature_one():
    model, tokenizer = load_base("smollm2-135m-instruct")
    peft_model = PeftModel(model, None)  # the bare base model
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
              "age": {"type": "integer", "minimum": 0, "maximum": 150}}, "required": ["name", "age"],
              "additionalProperties": False}  # fmt: skip
    settings = DecodingSettings(temperature=1.0, max_new_tokens=40, seed=0, grammar=Grammar(json_schema=schema))
    session = DecodingSession(peft_model, tokenizer, settings)
    template = ChatTemplate(tokenizer)
    ids = template.prompt_ids("Alice is 31. Give her name and age as JSON.")
    for _ in range(8):
        session.reset()
        jsonschema.validate(json.loads(session.generate(ids)), schema)


def test_conversation_ids_render_the_whole_conversation_with_the_generation_prompt(char_model):
    _, tokenizer = char_model
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]  # fmt: skip
    template = ChatTemplate(tokenizer, system="unused")
    plain = "System: be brief\nUser: hi\nhello\nUser: more\nAssistant:"  # no chat template: the plain layout
    assert template.conversation_ids(messages) == tokenizer(plain, add_special_tokens=False)["input_ids"]
    assert template.messages == [{"role": "system", "content": "unused"}]  # its own conversation is untouched
    one = [{"role": "user", "content": "hi"}]
    assert ChatTemplate(tokenizer).conversation_ids(one) == ChatTemplate(tokenizer).user_turn("hi")

    templated = copy.deepcopy(tokenizer)
    templated.chat_template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}.{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    text = "[system] be brief.[user] hi.[assistant] hello.[user] more.[assistant] "
    spelled = [templated.convert_tokens_to_ids(c.replace(" ", "\u0120")) for c in text]  # one id per character
    assert ChatTemplate(templated).conversation_ids(messages) == spelled
    with pytest.raises(ValueError, match="messages is empty"):
        template.conversation_ids([])
    with pytest.raises(ValueError, match=r"messages\[1\] needs a string 'role' and 'content'"):
        template.conversation_ids([messages[0], {"role": "user"}])
