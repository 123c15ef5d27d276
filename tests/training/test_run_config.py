"""Run config: YAML, key=value overrides, and error messages that name field, value and what is allowed."""

import pytest

from peftkit.config_files import apply_overrides, parse_override, parse_yaml
from peftkit.training.config import ConfigError, RunConfig
from peftkit.training.overrides import dump_run_config, load_run_config, validate_config

BASE = """
model: {name: smollm2-135m-instruct}
adapters:
  default: {peft_type: PROMPT_TUNING, num_virtual_tokens: 20}
data:
  train: rotten_tomatoes
  formatter: rotten_tomatoes
training:
  lr: 1e-2
  max_steps: 200
"""


def tree(**changes):
    base = parse_yaml(BASE)
    return apply_overrides(base, [f"{k}={v}" for k, v in changes.items()])


def problems(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return info.value.problems


def test_yaml_reads_exponent_floats():
    config = validate_config(tree())
    assert config.training.lr == 0.01 and isinstance(config.training.lr, float)
    assert config.data.train.builtin == "rotten_tomatoes"
    assert [c.name for c in config.loss] == ["cross_entropy"]


def test_overrides_nested_and_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(BASE + "callbacks: [{name: early_stopping, patience: 3}]\n")
    config = load_run_config(
        path,
        [
            "training.lr=3e-3",
            "adapters.default.num_virtual_tokens=10",
            "training.scheduler=cosine",
            "callbacks.0.patience=5",
            "data.train.limit=100",
            "training.max_grad_norm=null",
            "gradient_hooks.hooks=[norm, health]",
        ],
    )
    assert config.training.lr == 0.003
    assert config.adapters["default"]["num_virtual_tokens"] == 10
    assert config.training.scheduler == "cosine" and config.training.max_grad_norm is None
    assert config.callbacks[0].options == {"patience": 5}
    assert config.data.train.limit == 100 and config.data.train.builtin == "rotten_tomatoes"
    assert config.gradient_hooks.hooks == ["norm", "health"]


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_override("training.lr")
    with pytest.raises(ConfigError, match="'7' is not an index of a list of 1 items"):
        apply_overrides({"callbacks": [{"name": "x"}]}, ["callbacks.7.patience=1"])
    assert parse_override("output_dir='001'") == (["output_dir"], "001")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"training.lr": -1}, "training.lr = -1: Input should be greater than 0"),
        ({"training.scheduler": "step"}, "training.scheduler = 'step': Input should be 'constant', 'linear' or"),
        ({"training.batch_size": 0}, "training.batch_size = 0: Input should be greater than or equal to 1"),
        ({"training.adam_beta2": 1.0}, "training.adam_beta2 = 1.0: Input should be less than 1"),
        ({"training.precision": "fp16"}, "training.precision = 'fp16': Input should be 'fp32' or 'bf16'"),
        ({"training.lrr": 1}, "training.lrr: unknown field; known fields here: adam_beta1, adam_beta2"),
        ({"data.truncation": "middle"}, "data.truncation = 'middle': Input should be 'left', 'right' or 'drop'"),
        ({"training.warmup_ratio": 0.1, "training.warmup_steps": 5}, "training: give warmup_steps (5) or warmup_ratio"),
    ],
)
def test_invalid_values_name_field_value_and_allowed(changes, expected):
    found = problems(tree(**changes))
    assert any(line.startswith(expected) for line in found), found


def test_adapter_fields_are_checked_by_their_method():
    found = problems(tree(**{"adapters.default.num_virtual_tokens": -3}))
    assert any("adapters.default.num_virtual_tokens = -3" in p and "must be > 0" in p for p in found), found
    found = problems(tree(**{"adapters.default.peft_type": "NOPE"}))
    assert any("adapters.default.peft_type = 'NOPE'" in p and "PROMPT_TUNING" in p for p in found), found
    found = problems(tree(**{"adapters.default.rank": 4}))
    assert any("adapters.default.rank: unknown field" in p for p in found), found


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"data.formatter": "nope"}, "unknown formatter 'nope'; known formatters: chat, fever, gsm8k"),
        ({"loss": "hinge"}, "unknown loss 'hinge'; known losses: cross_entropy, kl_divergence, mse"),
        ({"loss": "[{name: kl_divergence, temperature: 0}]"}, "temperature must be > 0, got 0"),
        ({"callbacks": "[{name: stop_soon}]"}, "unknown callback 'stop_soon'; known callbacks: best_checkpoint"),
        ({"callbacks": "[{name: early_stopping, mode: up}]"}, "mode must be 'min' or 'max', got 'up'"),
        ({"gradient_hooks.hooks": "[norms]"}, "unknown gradient hook(s) ['norms']; known: distribution, flow"),
        ({"data.train": "{path: a.jsonl, builtin: rotten_tomatoes}"}, "give exactly one of path, builtin or records"),
        ({"data.train.options": "{split: dev, size: 3}"}, "dataset 'rotten_tomatoes' takes no option(s) ['size']"),
        ({"data.train": "{builtin: imdb}"}, "unknown dataset 'imdb'; built-in datasets: rotten_tomatoes"),
    ],
)
def test_registry_names_list_the_known_ones(changes, expected):
    found = problems(tree(**changes))
    assert any(expected in line for line in found), found


def test_streaming_needs_max_steps():
    raw = tree(**{"data.train": "{path: x.jsonl, streaming: true}"})
    del raw["training"]["max_steps"]
    assert any("data.train.streaming=true needs training.max_steps" in p for p in problems(raw))


def test_resolved_config_round_trips():
    config = validate_config(tree(**{"loss": "[{name: cross_entropy}, {name: kl_divergence, weight: 0.5}]"}))
    text = dump_run_config(config)
    again = validate_config(parse_yaml(text))
    assert again == config
    assert "warmup_steps" in text and "adam_epsilon" in text  # every default is written out


def test_imports_register_user_code_first(tmp_path):
    plugin = tmp_path / "my_formatters.py"
    plugin.write_text(
        "from peftkit.data.formatters import register_formatter\n"
        "@register_formatter('qa_test_plugin')\n"
        "def qa(record, *, q='q'):\n"
        "    return record[q], ' ' + record['a']\n"
    )
    config = validate_config(tree(**{"imports": f"[{plugin}]", "data.formatter": "qa_test_plugin"}))
    assert config.data.formatter == "qa_test_plugin"
    assert isinstance(config, RunConfig)


def test_docs_list_every_config_field():
    from pathlib import Path

    from peftkit.training import config as c

    docs = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    sections = [c.RunConfig, c.ModelConfig, c.DataConfig, c.SourceConfig, c.TrainingConfig, c.GradientHooksConfig]
    missing = [f"{s.__name__}.{f}" for s in sections for f in s.model_fields if f"`{f}`" not in docs]
    assert not missing, f"docs/training.md does not describe {missing}"
