"""``peftkit eval`` end to end on a tiny local model: report files, and exit codes that gate CI."""

import json

import pytest
import torch

from peftkit import PeftModel, load_base
from peftkit.cli.main import main
from peftkit.evaluation.run import load_eval_config
from tests.evaluation.conftest import CHOICES, records, save_adapter


@pytest.fixture(scope="module")
def adapter(tiny_folder, tmp_path_factory):
    return save_adapter(tiny_folder, tmp_path_factory.mktemp("adapter"), seed=1)


@pytest.fixture
def config(tiny_folder, adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    path = tmp_path / "eval.yaml"
    path.write_text(
        f"model: {{name: {tiny_folder}}}\n"
        f"data: {{eval: {{path: {tiny_folder / 'train.jsonl'}, limit: 12}}, batch_size: 5}}\n"
        f"prediction: {{choices: {json.dumps(CHOICES)}}}\n"
        f"variants: {{zero-shot: base, tuned: {adapter}}}\n"
        "metrics: [accuracy, f1, confusion_matrix]\n"
        'targets: ["accuracy >= 0"]\n'
        f"output_dir: {tmp_path / 'out'}\n"
    )
    return path


def direct_accuracy(tiny_folder, adapter, use_adapter):
    base, tokenizer = load_base(tiny_folder)
    model = PeftModel.from_pretrained(base, adapter)
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in CHOICES]
    correct = 0
    for record in records(tiny_folder, 12):
        prompt = torch.tensor([tokenizer(record["prompt"])["input_ids"]])
        with torch.no_grad():
            if use_adapter:
                logits = model(input_ids=prompt).logits[0, -1]
            else:
                with model.disable_adapter():
                    logits = model(input_ids=prompt).logits[0, -1]
        correct += CHOICES[int(logits[ids].argmax())] == record["completion"]
    return correct / 12


def test_eval_passes_and_writes_the_report(config, tiny_folder, adapter, tmp_path, capsys):
    assert main(["eval", str(config), "--no-progress"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "12 examples" in out and "Quality targets" in out and "PASS" in out
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["passed"] and list(data["variants"]) == ["zero-shot", "tuned"]
    assert data["variants"]["zero-shot"]["values"]["accuracy"] == pytest.approx(
        direct_accuracy(tiny_folder, adapter, False)
    )
    assert data["variants"]["tuned"]["values"]["accuracy"] == pytest.approx(direct_accuracy(tiny_folder, adapter, True))
    assert {"report.md", "metrics.png", "confusion_matrix.png", "per_class.png"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }


def test_failing_target_exits_1(config, capsys):
    assert main(["eval", str(config), "--no-progress", 'targets=["accuracy >= 1.01"]', "plots=false"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "FAIL" in out and "targets failed: accuracy >= 1.01 (tuned:" in out


def test_config_errors_exit_2_before_any_model_runs(config, capsys):
    assert main(["eval", str(config), 'targets=["f1_macr >= 0.8"]']) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "invalid eval config" in out and "no metric reports 'f1_macr'" in out and "f1_macro" in out
    assert main(["eval", str(config), "metrics=[accuracy, f2]"]) == 2
    assert "unknown metric 'f2'; known metrics: accuracy" in " ".join(capsys.readouterr().out.split())
    assert main(["eval", str(config), "variants.x=/no/such/folder"]) == 2
    assert "variants.x: no adapter_config.json in /no/such/folder" in " ".join(capsys.readouterr().out.split())
    assert main(["eval", str(config), "prediction.parser=number"]) == 2
    assert "parser applies to mode generate only" in " ".join(capsys.readouterr().out.split())


def test_print_config_and_overrides_only(config, tiny_folder, tmp_path, capsys):
    assert main(["eval", str(config), "--print-config", "data.eval.limit=3"]) == 0
    out = capsys.readouterr().out
    assert "limit: 3" in out and "mode: choices" in out
    (tmp_path / "resolved.yaml").write_text(out)  # the resolved config reads back as the same config
    assert load_eval_config(tmp_path / "resolved.yaml") == load_eval_config(config, ["data.eval.limit=3"])
    overrides = [
        f"model.name={tiny_folder}", f"data.eval={tiny_folder / 'train.jsonl'}", "data.eval.limit=4",
        f"prediction.choices={json.dumps(CHOICES)}", f"output_dir={tmp_path / 'flags'}",
    ]  # fmt: skip
    assert main(["eval", *overrides, "--no-progress"]) == 0
    assert json.loads((tmp_path / "flags" / "report.json").read_text())["examples"] == 4


def test_variant_lists_and_run_folders_share_one_load(tiny_folder, adapter, tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for f in adapter.iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    overrides = [
        f"model.name={tiny_folder}",
        f"data.eval={tiny_folder / 'train.jsonl'}",
        "prediction.choices=[' a', ' b']",
    ]
    overrides += [f"variants.a={adapter}", f"variants.b={run}", f"variants.c=[{adapter}]"]
    config = load_eval_config(None, overrides)
    folders, variants = config.variant_adapters()
    assert list(folders.values()) == [adapter.resolve(), (run / "adapter").resolve()]
    assert variants == {"a": ["a_0"], "b": ["b_1"], "c": ["a_0"]}
