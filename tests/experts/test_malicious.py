"""Hand-made malicious and corrupted packages: each is refused with a clear error, nothing is written.

Every case starts from the good tiny package and changes one thing. Each is tried with
``load_expert`` (the loading path) and ``extract_expert`` (unpacking), inside a folder whose whole
tree is compared before and after: an error must leave no file behind, anywhere.
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load as load_st
from safetensors.torch import save as save_st

from peftkit.experts.archive import Limits, extract_expert
from peftkit.experts.load import load_expert


def members_of(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rechecksummed(members: dict[str, bytes]) -> dict[str, bytes]:
    """``members`` with ``checksums.json`` recomputed (an attacker who edits the table too)."""
    files = {n: hashlib.sha256(d).hexdigest() for n, d in members.items() if n != "checksums.json"}
    return {**members, "checksums.json": json.dumps({"algorithm": "sha256", "files": files}).encode()}


def build(members: dict[str, bytes], extra: list[zipfile.ZipInfo | tuple[zipfile.ZipInfo, bytes]] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return buffer.getvalue()


def special(name: str, mode: int, data: bytes = b"x") -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info, data


def edit_manifest(members: dict[str, bytes], change) -> dict[str, bytes]:
    manifest = json.loads(members["manifest.json"])
    change(manifest)
    return rechecksummed({**members, "manifest.json": json.dumps(manifest).encode()})


def edit_tensor(members: dict[str, bytes], name: str, change) -> dict[str, bytes]:
    tensors = load_st(members[name])
    return rechecksummed({**members, name: save_st(change(tensors))})


STYLE = "soft_prompts/style/adapter_model.safetensors"

# name -> (build(members) -> bytes, Limits or None, message pattern)
CASES = {
    "absolute_path": (lambda m: build(m, [(zipfile.ZipInfo("/etc/cron.d/evil"), b"x")]), None,
                      "absolute paths are not allowed"),
    "dot_dot": (lambda m: build(m, [(zipfile.ZipInfo("../escape.json"), b"x")]), None, r"'\.\.' is not allowed"),
    "nested_dot_dot": (lambda m: build(m, [(zipfile.ZipInfo("soft_prompts/style/../../../x.json"), b"x")]), None,
                       r"'\.\.' is not allowed"),
    "backslash": (lambda m: build(m, [(zipfile.ZipInfo("soft_prompts\\..\\..\\x"), b"x")]), None, "backslashes"),
    "windows_drive": (lambda m: build(m, [(zipfile.ZipInfo("C:/Windows/evil.json"), b"x")]), None, "absolute paths"),
    "symlink": (lambda m: build(m, [special("config/link.json", stat.S_IFLNK | 0o777, b"/etc/passwd")]), None,
                "is a symbolic link"),
    "char_device": (lambda m: build(m, [special("config/dev.json", stat.S_IFCHR | 0o666)]), None,
                    "is a character device"),
    "block_device": (lambda m: build(m, [special("config/blk.json", stat.S_IFBLK | 0o666)]), None, "is a block device"),
    "fifo": (lambda m: build(m, [special("config/fifo.json", stat.S_IFIFO | 0o666)]), None, "is a FIFO"),
    "directory_entry": (lambda m: build(m, [(zipfile.ZipInfo("config/"), b"")]), None, "directory entries"),
    "duplicate_name": (lambda m: build(m, [(zipfile.ZipInfo("manifest.json"), b"{}")]), None, "duplicate member"),
    "case_duplicate": (lambda m: build(m, [(zipfile.ZipInfo(STYLE.replace("style", "Style")), m[STYLE])]), None,
                       "duplicate member"),
    "nul_in_name": (lambda m: build(m, [(zipfile.ZipInfo("config/a\x00.json"), b"x")]), None,
                    "'config/a' is not part of the package layout"),  # zipfile cuts the name at NUL
    "escape_sequence_in_name": (lambda m: build(m, [(zipfile.ZipInfo("config/\x1b[2Jx.json"), b"x")]), None,
                                "control characters"),
    "pickle_member": (lambda m: build(m, [(zipfile.ZipInfo("soft_prompts/style/adapter_model.bin"), b"\x80\x04")]),
                      None, "pickle-based files are never loaded"),
    "pt_member": (lambda m: build(m, [(zipfile.ZipInfo("weights.pt"), b"\x80\x04")]), None, "pickle-based"),
    "outside_layout": (lambda m: build(m, [(zipfile.ZipInfo("run.sh"), b"rm -rf ~")]), None, "not part of the package"),
    "zip_bomb": (lambda m: build(m, [(deflated("eval/report.md"), b"\0" * (8 << 20))]), None,
                 "compression ratio .*zip bomb"),
    "too_many_members": (lambda m: build(m, [(zipfile.ZipInfo(f"config/{chr(97 + i // 26)}{chr(97 + i % 26)}.json"),
                                              b"{}") for i in range(300)]), None, "members exceeds the limit 256"),
    "member_too_large": (lambda m: build(m), Limits(max_member_bytes=100), "exceeds the limit 100"),
    "total_too_large": (lambda m: build(m), Limits(max_total_bytes=1000), "more than 1000 bytes uncompressed"),
    "encrypted_flag": (lambda m: encrypted(build(m, [(zipfile.ZipInfo("config/x.json"), b"{}")]), b"config/x.json"),
                       None, "is encrypted"),
    "not_a_zip": (lambda m: b"PK\x03\x04 this is not really a zip" * 10, None, "not a zip archive"),
    "empty_file": (lambda m: b"", None, "not a zip archive"),
    "truncated": (lambda m: build(m)[:-200], None, "not a zip archive|not a readable zip"),
    "no_manifest": (lambda m: build(rechecksummed({k: v for k, v in m.items() if k != "manifest.json"})), None,
                    "no manifest.json"),
    "no_checksums": (lambda m: build({k: v for k, v in m.items() if k != "checksums.json"}), None,
                     "no checksums.json"),
    "manifest_tampered": (lambda m: build({**m, "manifest.json": m["manifest.json"].replace(b"0.7", b"1.9")}), None,
                          "member 'manifest.json': SHA-256 .* does not match"),
    "tensor_tampered": (lambda m: build({**m, STYLE: m[STYLE][:-4] + b"\x00\x00\x80\x7f"}), None,
                        f"member '{STYLE}': SHA-256"),
    "checksum_lists_missing_file": (lambda m: build({k: v for k, v in m.items() if k != STYLE}), None,
                                    "lists files the package does not hold"),
    "unlisted_member": (lambda m: build(m, [(zipfile.ZipInfo("config/extra.json"), b"{}")]), None,
                        "members without a checksum"),
    "bad_checksum_table": (lambda m: build({**m, "checksums.json": b'{"algorithm": "md5", "files": {}}'}), None,
                           "expected {'algorithm': 'sha256'"),
    "manifest_not_json": (lambda m: build(rechecksummed({**m, "manifest.json": b"name: [yaml"})), None,
                          "'manifest.json' is not valid JSON"),
    "manifest_out_of_range": (lambda m: build(edit_manifest(m, lambda d: d["decoding"].update(temperature=5))), None,
                              "decoding.temperature=5: Input should be less than or equal to 2"),
    "manifest_unknown_field": (lambda m: build(edit_manifest(m, lambda d: d.update(run_on_load="curl x | sh"))),
                               None, "run_on_load.*Extra inputs are not permitted"),
    "safetensors_garbage": (lambda m: build(rechecksummed({**m, STYLE: b"\xff" * 64})), None,
                            "not a valid safetensors file"),
    "safetensors_huge_header": (lambda m: build(rechecksummed({**m, STYLE: (1 << 40).to_bytes(8, "little") + b"{}"})),
                                None, "not a valid safetensors file"),
    "tokens_do_not_match_tensor": (lambda m: build(edit_manifest(m, lambda d: d["soft_prompts"][0].update(tokens=7))),
                                   None, r"soft_prompts.style: tensor shape \[3, 32\] does not match tokens=7"),
    "wrong_hidden_size": (lambda m: build(edit_tensor(m, STYLE, lambda t: {k: v[:, :16].contiguous()
                                                                         for k, v in t.items()})),
                          None, r"tensor shape \[3, 16\] does not match"),
    "fingerprint_mismatch": (lambda m: build(edit_manifest(m, lambda d: d["base_model"]["fingerprint"].update(
        num_layers=30, hidden_size=576))), None,
        r"built for .*hidden 576, 30 layers.* is LlamaForCausalLM \(hidden 32, 2 layers",
        r"tensor shape \[3, 32\] does not match tokens=3 × hidden_size=576"),
    "weights_path_elsewhere": (lambda m: build(edit_manifest(m, lambda d: d["soft_prompts"][0].update(
        weights="/etc/passwd"))), None, "weights '/etc/passwd' are not in"),
}  # fmt: skip


def deflated(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def encrypted(data: bytes, name: bytes) -> bytes:
    """Set the "encrypted" flag of member ``name`` in its local header and central directory entry."""
    out = bytearray(data)
    for signature, flag_offset, name_offset in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        start = 0
        while (at := out.find(signature, start)) >= 0:
            if out[at + name_offset : at + name_offset + len(name)] == name:
                out[at + flag_offset] |= 0x1
            start = at + 4
    return bytes(out)


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile warns while the test builds that case
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_package_is_refused_and_nothing_is_written(case, expert_file, char_base, tmp_path, monkeypatch):
    make, limits, message, *extract_message = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    bad = work / "bad-0.1.0.expert"
    bad.write_bytes(make(members_of(expert_file)))
    monkeypatch.chdir(work)
    before = tree(tmp_path)
    if limits is None:
        with pytest.raises(ValueError, match=message):
            load_expert(bad, base=char_base)
    with pytest.raises(ValueError, match=(extract_message or [message])[0]):
        extract_expert(bad, work / "target", limits)
    assert tree(tmp_path) == before  # not even the target folder was created


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_the_good_package_passes_the_same_path(expert_file, char_base, tmp_path):
    rebuilt = tmp_path / "good.expert"
    rebuilt.write_bytes(build(members_of(expert_file)))
    assert load_expert(rebuilt, base=char_base).model.active_adapters == ["style", "task", "lora"]
