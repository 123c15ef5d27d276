"""Reading ``.expert`` archives safely: every check happens before anything is used or written.

An expert is a zip archive. :func:`open_expert` refuses, with an error naming the member:

* member names that are absolute, contain ``..``, backslashes, NUL or control characters, empty
  segments, or are not in the package layout (so ``.pt`` / ``.bin`` / pickle files are refused);
* links, devices, FIFOs, sockets and directories (only regular files are allowed);
* duplicate names (also after case folding: a package must unpack the same on every file system);
* encrypted members and compression methods other than stored / deflate;
* more than ``limits.max_members`` members, a member larger than ``limits.max_member_bytes``, a
  total above ``limits.max_total_bytes``, or a compression ratio above ``limits.max_ratio`` (zip
  bombs). Reads are capped at the declared size too, so a lying header cannot inflate past it;
* a ``checksums.json`` that does not list exactly the other members, or any SHA-256 that differs.
  Every checksum is verified before any tensor is parsed.

Nothing is written to disk by :func:`open_expert`; :func:`extract_expert` writes only inside its
target folder, and only after every check has passed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
CHECKSUMS = "checksums.json"
LAYOUT = re.compile(
    r"^(manifest\.json|checksums\.json"
    r"|(soft_prompts|adapters)/[A-Za-z_][A-Za-z0-9_-]{0,63}/(adapter_config\.json|adapter_model\.safetensors)"
    r"|config/[a-z_]{1,32}\.json"
    r"|eval/(report\.json|report\.md))$"
)
KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")


class ExpertPackageError(ValueError):
    """An expert file that is malformed, corrupted or unsafe (the message says which member and why)."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what an archive may hold."""

    max_members: int = 256
    max_member_bytes: int = 2 << 30
    max_total_bytes: int = 4 << 30
    max_ratio: float = 200.0
    max_json_bytes: int = 4 << 20


def check_member_name(name: str) -> None:
    """Refuse any name that is not a plain relative path in the package layout."""
    if not name:
        raise ExpertPackageError("a member has an empty name")
    if "\x00" in name or any(ord(c) < 32 for c in name):
        raise ExpertPackageError(f"member {name!r}: control characters in the name")
    if "\\" in name:
        raise ExpertPackageError(f"member {name!r}: backslashes are not allowed in member names")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ExpertPackageError(f"member {name!r}: absolute paths are not allowed")
    parts = name.split("/")
    if ".." in parts:
        raise ExpertPackageError(f"member {name!r}: '..' is not allowed in member names")
    if name.endswith("/"):
        raise ExpertPackageError(f"member {name!r}: directory entries are not allowed (only regular files)")
    if any(p in ("", ".") for p in parts):
        raise ExpertPackageError(f"member {name!r}: empty or '.' path segments are not allowed")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise ExpertPackageError(f"member {name!r}: pickle-based files are never loaded (weights are safetensors only)")
    if not LAYOUT.match(name):
        raise ExpertPackageError(
            f"member {name!r} is not part of the package layout (manifest.json, checksums.json, "
            "soft_prompts/<name>/…, adapters/<name>/…, config/<name>.json, eval/report.json|md)"
        )


def check_member_info(info: zipfile.ZipInfo, limits: Limits) -> None:
    name = info.filename
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode:  # Unix: the file type is in the high bits
        kind = stat.S_IFMT(mode)
        if kind and kind != stat.S_IFREG:
            what = KINDS.get(kind, "not a regular file")
            raise ExpertPackageError(f"member {name!r} is {what}: only regular files are allowed")
    if info.flag_bits & 0x1:
        raise ExpertPackageError(f"member {name!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ExpertPackageError(f"member {name!r}: compression method {info.compress_type} (only stored or deflate)")
    if info.file_size > limits.max_member_bytes:
        raise ExpertPackageError(f"member {name!r}: {info.file_size} bytes exceeds the limit {limits.max_member_bytes}")
    if info.file_size > 1024 and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        raise ExpertPackageError(
            f"member {name!r}: compression ratio {info.file_size / max(info.compress_size, 1):.0f}:1 exceeds "
            f"{limits.max_ratio:.0f}:1 (zip bomb?)"
        )


class ExpertArchive:
    """A checked ``.expert`` archive: the names are safe and every checksum has been verified."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, limits: Limits) -> None:
        self.path, self._zip, self.limits = path, zf, limits
        self.members = {i.filename: i for i in zf.infolist()}
        self.checksums: dict[str, str] = {}

    def read(self, name: str) -> bytes:
        """The bytes of ``name``, read with a hard cap at its declared size."""
        info = self.members.get(name)
        if info is None:
            raise ExpertPackageError(f"{self.path.name}: no member {name!r}")
        chunks, total = [], 0
        try:
            with self._zip.open(info) as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
                    if total > info.file_size:
                        raise ExpertPackageError(f"member {name!r} inflates past its declared size {info.file_size}")
                    chunks.append(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise ExpertPackageError(f"member {name!r} is corrupted ({exc})") from None
        data = b"".join(chunks)
        if len(data) != info.file_size:
            raise ExpertPackageError(f"member {name!r} is truncated ({len(data)} of {info.file_size} bytes)")
        return data

    def read_json(self, name: str) -> Any:
        if self.members[name].file_size > self.limits.max_json_bytes:
            raise ExpertPackageError(
                f"member {name!r} is too large for a JSON file ({self.members[name].file_size} bytes)"
            )
        try:
            return json.loads(self.read(name).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ExpertPackageError(f"member {name!r} is not valid JSON ({exc})") from None

    def verify_checksums(self) -> None:
        """``checksums.json`` lists every other member exactly once, and each SHA-256 matches."""
        if CHECKSUMS not in self.members:
            raise ExpertPackageError(f"{self.path.name}: no {CHECKSUMS} (every package lists the SHA-256 of its files)")
        table = self.read_json(CHECKSUMS)
        files = table.get("files") if isinstance(table, dict) else None
        if table.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ExpertPackageError(f"{CHECKSUMS}: expected {{'algorithm': 'sha256', 'files': {{name: digest}}}}")
        listed, present = set(files), set(self.members) - {CHECKSUMS}
        if missing := sorted(listed - present):
            raise ExpertPackageError(f"{CHECKSUMS} lists files the package does not hold: {missing}")
        if unlisted := sorted(present - listed):
            raise ExpertPackageError(f"members without a checksum (not part of the package as built): {unlisted}")
        for name in sorted(listed):
            expected = files[name]
            if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
                raise ExpertPackageError(f"{CHECKSUMS}: {name!r} has no valid SHA-256 ({expected!r})")
            actual = hashlib.sha256(self.read(name)).hexdigest()
            if actual != expected:
                raise ExpertPackageError(f"member {name!r}: SHA-256 {actual} does not match {CHECKSUMS} ({expected})")
        self.checksums = dict(files)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> ExpertArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_expert(path: str | Path, limits: Limits | None = None) -> ExpertArchive:
    """Open ``path`` and run every structural check and every checksum; see the module docstring."""
    path, limits = Path(path), limits or Limits()
    if not path.is_file():
        raise ExpertPackageError(f"{path}: no such expert file")
    if not zipfile.is_zipfile(path):
        raise ExpertPackageError(f"{path.name} is not an expert package (not a zip archive)")
    try:
        zf = zipfile.ZipFile(path)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:
        raise ExpertPackageError(f"{path.name} is not a readable zip archive ({exc})") from None
    try:
        if len(infos) > limits.max_members:
            raise ExpertPackageError(f"{path.name}: {len(infos)} members exceeds the limit {limits.max_members}")
        seen: dict[str, str] = {}
        total = 0
        for info in infos:
            check_member_name(info.filename)
            check_member_info(info, limits)
            key = info.filename.casefold()
            if key in seen:
                raise ExpertPackageError(f"duplicate member name {info.filename!r} (also {seen[key]!r})")
            seen[key] = info.filename
            total += info.file_size
            if total > limits.max_total_bytes:
                raise ExpertPackageError(f"{path.name}: more than {limits.max_total_bytes} bytes uncompressed")
        if MANIFEST not in seen:
            raise ExpertPackageError(f"{path.name}: no {MANIFEST}")
        archive = ExpertArchive(path, zf, limits)
        archive.verify_checksums()
        return archive
    except BaseException:
        zf.close()
        raise


def extract_expert(path: str | Path, target: str | Path, limits: Limits | None = None) -> list[Path]:
    """Unpack a checked expert into ``target`` (absent or empty); nothing is written elsewhere.

    Every check (names, sizes, checksums, the manifest, tensor shapes) runs before the first byte is written.
    """
    from peftkit.experts.load import read_expert

    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ExpertPackageError(f"{target} must be an empty folder or not exist")
    contents = read_expert(path, limits).members
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    written = []
    for name, data in contents.items():
        destination = (root / name).resolve()
        if root not in destination.parents:
            raise ExpertPackageError(f"member {name!r} would land outside {target}")
        destination.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(destination, flags, 0o644), "wb") as f:
            f.write(data)
        written.append(destination)
    return written
