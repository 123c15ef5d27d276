"""Export for vLLM: prompt_embeds equal peftkit's prompt tuning, LoRA folders equal in HF PEFT."""

from __future__ import annotations

import base64
import http.server
import importlib.util
import io
import json
import threading
import zipfile
from typing import ClassVar

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftkit
from peftkit.cli.main import main
from peftkit.serving.vllm_export import cache_salt, encode_prompt_embeds, export_vllm, prompt_embeds
from tests.conftest import tiny_model
from tests.experts.conftest import char_folder, expert_file, trained_manifest  # noqa: F401 (fixtures)

IDS = torch.tensor([[5, 17, 42, 9, 77, 3]])


def client_module(folder):
    spec = importlib.util.spec_from_file_location("client_example", folder / "client_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def saved_prompt_tuning(folder, arch="llama", tokens=4, **config):
    torch.manual_seed(1)
    model = peftkit.get_peft_model(tiny_model(arch), peftkit.PromptTuningConfig(num_virtual_tokens=tokens, **config))
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.normal_()  # far from any token embedding, so a misplaced prompt shows
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3 scales its token embeddings, not the prompt
def test_prompt_embeds_as_inputs_embeds_give_peftkit_prompt_tuning_logits(tmp_path, arch):
    model = saved_prompt_tuning(tmp_path / "expert-a", arch)
    index = export_vllm(tmp_path / "expert-a", tmp_path / "out")
    entry = index["experts"]["expert-a"]
    assert entry["num_virtual_tokens"] == 4 and "lora" not in entry
    soft = load_file(str(tmp_path / "out" / entry["prompt_embeds"]))["prompt_embeds"]
    base = tiny_model(arch)  # a fresh copy of the frozen base
    embeds = prompt_embeds(soft, IDS[0], base.get_input_embeddings())
    assert embeds.shape == (4 + IDS.shape[1], base.config.hidden_size)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        actual = base(inputs_embeds=embeds[None]).logits[:, 4:]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    client = client_module(tmp_path / "out")
    assert torch.equal(client.build_prompt_embeds(soft, IDS[0].tolist(), base.get_input_embeddings()), embeds)


def test_exported_lora_loads_in_hf_peft_with_equal_logits(tmp_path):
    torch.manual_seed(2)
    config = peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peftkit.get_peft_model(tiny_model("llama"), config)
    model.save_pretrained(tmp_path / "lora-x")
    index = export_vllm(tmp_path / "lora-x", tmp_path / "out")
    entry = index["experts"]["lora-x"]
    assert entry["lora"] == "lora/lora-x" and entry["model"] == "lora-x" and "prompt_embeds" not in entry
    assert (
        f"--enable-lora --max-lora-rank 8 --max-loras 1 --lora-modules lora-x={tmp_path / 'out' / 'lora' / 'lora-x'}"
        in index["vllm_serve"]
    )
    reference = peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "out" / "lora" / "lora-x"))
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(tiny_model("llama")(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-3)


def test_an_expert_file_exports_its_soft_prompts_and_lora_with_peftkits_logits(expert_file, char_folder, tmp_path):  # noqa: F811
    """Two soft prompts (concatenated in peftkit's order) and a LoRA: HF PEFT's LoRA model fed the
    exported prompt_embeds gives the logits of the loaded expert."""
    from peftkit.experts.load import load_expert

    loaded = load_expert(expert_file)
    index = export_vllm(expert_file, tmp_path / "out")
    entry = index["experts"]["tiny-json"]
    assert entry["num_virtual_tokens"] == 3 + 2 and entry["lora"] == "lora/tiny-json"
    soft = load_file(str(tmp_path / "out" / entry["prompt_embeds"]))["prompt_embeds"]
    base = AutoModelForCausalLM.from_pretrained(char_folder).eval()
    reference = peft.PeftModel.from_pretrained(base, str(tmp_path / "out" / entry["lora"])).eval()
    with torch.no_grad():
        embeds = prompt_embeds(soft, IDS[0], reference.get_input_embeddings())
        actual = reference(inputs_embeds=embeds[None]).logits[:, 5:]
        expected = loaded.model(input_ids=IDS).logits
        with reference.disable_adapter():
            without_lora = reference(inputs_embeds=embeds[None]).logits[:, 5:]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert (without_lora - expected).abs().max() > 1e-4  # the LoRA matters: it is in the export


def test_a_bank_gives_one_prompt_per_expert_and_prefix_tuning_is_skipped(tmp_path):
    source = tmp_path / "experts"
    bank = saved_prompt_tuning(source / "bank", tokens=3, expert_ids=["alice", "bob"])
    torch.manual_seed(0)
    prefix = peftkit.get_peft_model(tiny_model("llama"), peftkit.PrefixTuningConfig(num_virtual_tokens=2))
    prefix.save_pretrained(source / "prefix-one")
    index = export_vllm(source, tmp_path / "out")
    assert sorted(index["experts"]) == ["alice", "bob"]
    assert "key" in index["skipped"]["prefix-one"] and "prompt_embeds" in index["skipped"]["prefix-one"]
    table = bank.prompt_encoder["default"].table.detach()
    for row, name in enumerate(["alice", "bob"]):
        saved = load_file(str(tmp_path / "out" / index["experts"][name]["prompt_embeds"]))["prompt_embeds"]
        assert torch.equal(saved, table[row])
    salts = {n: e["cache_salt"] for n, e in index["experts"].items()}
    assert salts["alice"] != salts["bob"] and salts == {
        n: e["cache_salt"] for n, e in export_vllm(source, tmp_path / "again")["experts"].items()
    }
    with pytest.raises(ValueError, match="nothing to export: prefix-one: .*PREFIX_TUNING"):
        export_vllm(source / "prefix-one", tmp_path / "none")


def test_cache_salt_depends_on_the_name_and_every_weight():
    prompt = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    salt = cache_salt("a", {"prompt_embeds": prompt})
    assert salt == cache_salt("a", {"prompt_embeds": prompt.clone()}) and len(salt) == 64
    assert salt != cache_salt("b", {"prompt_embeds": prompt})
    changed = prompt.clone()
    changed[3, 7] += 1e-6
    assert salt != cache_salt("a", {"prompt_embeds": changed})


def test_the_wire_format_is_torch_save_in_base64_checked_without_unpickling():
    embeds = torch.randn(3, 5)
    data = io.BytesIO(base64.b64decode(encode_prompt_embeds(embeds)))
    with zipfile.ZipFile(data) as archive:  # torch.save's zip layout: data.pkl + one file per storage
        names = archive.namelist()
        assert any(n.endswith("/data.pkl") for n in names)
        storage = archive.read(next(n for n in names if n.endswith("/data/0")))
    assert storage == embeds.numpy().tobytes()


def test_the_cli_exports_skips_unsupported_adapters_and_refuses_a_full_folder(tmp_path, capsys):
    source = tmp_path / "experts"
    saved_prompt_tuning(source / "prompt-a")
    peftkit.get_peft_model(
        tiny_model("llama"), peftkit.IA3Config(target_modules=["k_proj"], feedforward_modules=[])
    ).save_pretrained(source / "ia3-b")
    out = tmp_path / "out"
    assert main(["export", "--format", "vllm", "--experts", str(source), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prompt-a: soft prompt prompts/prompt-a.safetensors (4 tokens)" in printed and "skipped ia3-b" in printed
    index = json.loads((out / "index.json").read_text())
    assert "vLLM serves LoRA weight adapters only" in index["skipped"]["ia3-b"]
    assert (out / "client_example.py").is_file() and index["vllm_serve"].count("--enable-prompt-embeds") == 1
    assert main(["export", "--format", "vllm", "--experts", str(source), "--output", str(out)]) == 2
    assert "not empty" in capsys.readouterr().out
    args = ["export", "--format", "vllm", "--experts", str(source), "--output", str(out), "--overwrite"]
    assert main(args) == 0


@pytest.mark.smollm2
def test_smollm2_greedy_from_the_clients_prompt_embeds_equals_peftkit_generate(tmp_path):
    """What vLLM would compute from the client's request, with HF transformers standing in for vLLM."""
    from peftkit.models.loading import load_base, load_tokenizer

    model, tokenizer = load_base("smollm2-135m-instruct")
    config = peftkit.PromptTuningConfig(
        num_virtual_tokens=8,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="Answer in French, briefly:",
        tokenizer_name_or_path="smollm2-135m-instruct",
        base_model_name_or_path="smollm2-135m-instruct",
    )
    expert = peftkit.get_peft_model(model, config, tokenizer=tokenizer)
    expert.save_pretrained(tmp_path / "french")
    index = export_vllm(tmp_path / "french", tmp_path / "out")
    entry = index["experts"]["french"]
    client = client_module(tmp_path / "out")
    ids = load_tokenizer(entry["base_model"])("The capital of Italy is")["input_ids"]
    soft = load_file(str(tmp_path / "out" / entry["prompt_embeds"]))["prompt_embeds"]
    embeds = client.build_prompt_embeds(soft, ids, client.load_input_embeddings(entry["base_model"]))
    base = AutoModelForCausalLM.from_pretrained(entry["base_model"], dtype=torch.float32).eval()
    with torch.no_grad():
        served = base.generate(inputs_embeds=embeds[None], max_new_tokens=12, do_sample=False, eos_token_id=[])
        expected = expert.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=[])
    assert served[0].tolist() == expected[0, len(ids) :].tolist()


class StubVllm(http.server.BaseHTTPRequestHandler):
    """Answers /v1/models and /v1/completions like vLLM, recording each request body."""

    bodies: ClassVar[list[dict]] = []

    def _reply(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply(
            {"object": "list", "data": [{"id": "base-folder", "object": "model", "created": 0, "owned_by": "x"}]}
        )

    def do_POST(self) -> None:
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        choice = {"index": 0, "text": '{"n":5}', "finish_reason": "stop", "logprobs": None}
        self._reply({"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]})

    def log_message(self, *args) -> None:
        pass


def test_the_client_example_sends_the_prompt_embeds_and_cache_salt(char_folder, tmp_path, capsys):  # noqa: F811
    base = AutoModelForCausalLM.from_pretrained(char_folder).eval()
    config = peftkit.PromptTuningConfig(num_virtual_tokens=3, base_model_name_or_path=str(char_folder))
    peftkit.get_peft_model(base, config).save_pretrained(tmp_path / "numbers")
    index = export_vllm(tmp_path / "numbers", tmp_path / "out")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubVllm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        client_module(tmp_path / "out").main(["--expert", "numbers", "--prompt", "num 5", "--url", url])
    finally:
        server.shutdown()
    assert capsys.readouterr().out.strip() == '{"n":5}'
    body = StubVllm.bodies[-1]
    assert body["model"] == "base-folder" and body["prompt"] == "" and body["temperature"] == 0.0
    assert body["cache_salt"] == index["experts"]["numbers"]["cache_salt"]
    soft = load_file(str(tmp_path / "out" / "prompts" / "numbers.safetensors"))["prompt_embeds"]
    ids = AutoTokenizer.from_pretrained(char_folder)("num 5")["input_ids"]
    expected = prompt_embeds(soft, ids, AutoModelForCausalLM.from_pretrained(char_folder).get_input_embeddings())
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(body["prompt_embeds"]))) as archive:
        storage = archive.read(next(n for n in archive.namelist() if n.endswith("/data/0")))
    assert storage == expected.detach().numpy().tobytes()
