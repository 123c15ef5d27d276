"""The command line: parsing, errors, and the models subcommand."""

import pytest

from peftkit.cli.main import build_parser, main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "demo" in out and "models" in out


def test_demo_defaults():
    args = build_parser().parse_args(["demo"])
    assert (args.steps, args.batch_size, args.tokens, args.test_size) == (200, 8, 20, 400)
    assert args.precision == "fp32"
    assert build_parser().parse_args(["demo", "--precision", "bf16"]).precision == "bf16"


def test_demo_passes_its_precision_on(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("peftkit.cli.demo.run_demo", lambda settings, console: seen.setdefault("s", settings))
    assert main(["demo", "--precision", "bf16", "--output", str(tmp_path)]) == 0
    assert seen["s"].precision == "bf16"


def test_demo_bf16_keeps_fp32_weights_on_cpu_and_stores_bf16_on_a_gpu(monkeypatch):
    """On a CPU, autocast over fp32 weights (cached bf16 copies) is the faster bf16; on a GPU, a bf16 base."""
    import torch

    from peftkit.cli import demo

    assert demo.demo_dtype(demo.DemoSettings(precision="bf16", device="cpu")) == torch.float32
    assert demo.demo_dtype(demo.DemoSettings(precision="fp32", device="cpu")) == torch.float32
    monkeypatch.setattr(demo, "resolve_device", lambda setting: torch.device("cuda"))
    assert demo.demo_dtype(demo.DemoSettings(precision="bf16", device="cuda")) == torch.bfloat16
    assert demo.demo_dtype(demo.DemoSettings(precision="fp32", device="cuda")) == torch.float32


def test_unknown_alias_is_an_error(capsys):
    assert main(["models", "prepare", "nope"]) == 2
    assert "unknown alias 'nope'" in capsys.readouterr().out


def test_models_list(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["models", "list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_demo_reports_a_bad_model_cleanly(capsys, tmp_path):
    assert main(["demo", "--model", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().out
