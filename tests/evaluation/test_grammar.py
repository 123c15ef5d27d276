"""Grammar-constrained JSON generation (xgrammar) on a tiny model with a character tokenizer."""

import json

import pytest

from peftkit import PromptTuningConfig, get_peft_model, load_base
from peftkit.evaluation import DecodingSettings, EvalExample, Evaluation, GenerationPredictor
from peftkit.evaluation.parsers import build_parser
from tests.evaluation.conftest import write_char_folder

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    base, tokenizer = load_base(write_char_folder(tmp_path_factory.mktemp("chars")))
    return get_peft_model(base, PromptTuningConfig(num_virtual_tokens=2)), tokenizer


def evaluate(model, tokenizer, grammar):
    examples = [EvalExample.from_text(p) for p in ["name: ", "a", "give json", "x y z 1 2"]]
    predictor = GenerationPredictor(build_parser("json"), DecodingSettings(max_new_tokens=16), grammar=grammar,
                                    schema=SCHEMA)  # fmt: skip
    task = Evaluation(tokenizer, examples, predictor, ["json_validity", "schema_compliance"], schema=SCHEMA,
                      batch_size=3)  # fmt: skip
    return task.run(model, progress=False)


def test_schema_grammar_gives_compliant_json(char_model):
    model, tokenizer = char_model
    free = evaluate(model, tokenizer, None)
    assert free.values["schema_compliance"] == 0.0  # a random model spells no JSON by itself
    constrained = evaluate(model, tokenizer, "json_schema")
    assert constrained.values == {"json_validity": 1.0, "schema_compliance": 1.0}
    for p in constrained.predictions:
        assert json.loads(p.output) in ({"ok": True}, {"ok": False})


def test_json_grammar_gives_json_or_stops_at_the_token_limit(char_model):
    model, tokenizer = char_model
    result = evaluate(model, tokenizer, "json")
    for p in result.predictions:
        assert p.output[:1] and p.output[0] in "{["  # every row starts a JSON object or array
        if p.parsed:
            assert json.loads(p.output) == p.answer
