"""peftkit generate / chat: settings from the manifest, flags override, sources printed, piped stdin."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from peftkit.cli.main import main


def startup_lines(err: str) -> dict[str, str]:
    return {line.split("=", 1)[0]: line.split("=", 1)[1] for line in err.splitlines() if "=" in line.split(" ")[0]}


def test_generate_uses_the_manifest_and_flags_override_it(expert_file, capsys):
    assert main(["generate", "--expert", str(expert_file), "--top-p", "0.9", "--seed", "5", "num 7"]) == 0
    captured = capsys.readouterr()
    lines = startup_lines(captured.err)
    assert lines["temperature"] == "0.7 (manifest)"
    assert lines["top_p"] == "0.9 (--top-p)"
    assert lines["top_k"] == "0 (default)"
    assert lines["stop"] == "['}'] (manifest)"
    assert lines["grammar"] == "'json_schema' (manifest)"
    assert lines["attention_kernel"] == "sdpa (manifest)"
    assert lines["kv_cache_persistence"] == "True (manifest)"
    output = captured.out.strip()
    assert output.startswith('{"n":') and "}" not in output  # the grammar writes JSON, the stop "}" cuts it


def test_ignore_manifest_decoding(expert_file, capsys):
    assert main(["generate", "--expert", str(expert_file), "--ignore-manifest-decoding", "--max-new-tokens", "3",
                 "num 7"]) == 0  # fmt: skip
    lines = startup_lines(capsys.readouterr().err)
    assert lines["temperature"] == "0.0 (default)"
    assert lines["grammar"] == "None (default)"
    assert lines["max_new_tokens"] == "3 (--max-new-tokens)"


def test_out_of_range_flag_is_an_error_naming_the_flag(expert_file, capsys):
    assert main(["generate", "--expert", str(expert_file), "--temperature", "3", "x"]) == 2
    assert "--temperature: temperature=3.0: Input should be less than or equal to 2" in capsys.readouterr().out


def test_chat_with_piped_stdin_keeps_the_cache_across_turns(expert_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [sys.executable, "-m", "peftkit.cli.main", "chat", "--expert", str(expert_file), "--no-grammar",
         "--temperature", "0", "--max-new-tokens", "4", "--no-chat-template"],
        input="num 4\nnum 7\n\nnum 9\n", capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    replies = result.stdout.split("\n")[:-1]
    assert len(replies) == 3  # one line per non-empty turn
    stats = [line for line in result.stderr.splitlines() if line.startswith("[")]
    computed = [int(line.split("computed ")[1].split(" ")[0]) for line in stats]
    assert len(computed) == 3 and computed[2] < computed[0] + 10  # later turns encode only their new tokens
    assert "kv_cache_persistence=True (manifest)" in result.stderr


def test_chat_output_is_the_same_with_and_without_the_cache(expert_file, capsys, monkeypatch):
    outputs = {}
    for flag in ("--kv-cache", "--no-kv-cache"):
        monkeypatch.setattr(sys, "stdin", io.StringIO("num 4\nnum 7\nnum 9\n"))
        assert main(["chat", "--expert", str(expert_file), flag, "--temperature", "0", "--max-new-tokens", "5"]) == 0
        captured = capsys.readouterr()
        outputs[flag] = captured.out
        assert f"kv_cache_persistence={flag == '--kv-cache'} (flag)" in captured.err
    assert outputs["--kv-cache"] == outputs["--no-kv-cache"]
    assert len(outputs["--kv-cache"].split("\n")) == 4


def test_inspect_and_validate_commands(expert_file, capsys, tmp_path):
    assert main(["inspect", str(expert_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in info["soft_prompts"]] == ["style", "task"]
    assert main(["inspect", str(expert_file), "--extract", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "manifest.json").is_file()
    assert main(["validate", str(expert_file)]) == 0
    out = capsys.readouterr().out
    assert "runtime.attention_kernel = 'sdpa': applied" in out
    assert "valid, 1 warning(s)" in out


def test_chat_in_a_terminal(expert_file):
    """A real pseudo-terminal: the prompt, a streamed reply, /exit."""
    import pty

    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen(
        [sys.executable, "-m", "peftkit.cli.main", "chat", "--expert", str(expert_file), "--max-new-tokens", "4"],
        stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    try:
        _converse(master, process)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)


def _converse(master: int, process: subprocess.Popen) -> None:
    import select
    import time

    seen = b""

    def read_until(marker: bytes, timeout: float = 900) -> None:  # generous: the test machine is shared
        nonlocal seen
        end = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < end:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        assert marker in seen, seen

    read_until(b"> ")
    assert b"Type a message" in seen and b"temperature=0.7 (manifest)" in seen
    os.write(master, b"num 4\n")
    seen = b""
    read_until(b"> ")  # the reply, then the next prompt
    os.write(master, b"/exit\n")
    assert process.wait(timeout=300) == 0
