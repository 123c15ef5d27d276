"""The expert registry: expert name → :class:`~peftkit.serving.types.ServedExpert`, loaded from the experts folder.

::

    root/                                        registry                         engine
      json-expert-0.1.0.expert  ──read──►  "json-expert"  soft prompt + LoRA ──► LoraBank (slot "json-expert")
      sql/  (PEFT LoRA folder)  ──read──►  "sql"          LoRA               ──► LoraBank (slot "sql")
      tone/ (PEFT p-tuning)     ──read──►  "tone"         prompt (n, D), encoder run once
      personas/ (bank, 10k ids) ──read──►  "p00000" ...   views of ONE table (N, n, W), made on first use

Experts load at start (:meth:`load_all`) and on demand (:meth:`get` of a name not loaded reads
``root/<name>.expert``, ``root/<name>-<version>.expert`` or ``root/<name>/``). Every (re)load bumps the
expert's ``version``, so caches keyed on it (the prefix store) never serve stale keys/values.

Under ``memory_budget_bytes`` the least recently used experts are evicted (a bank expert counts its row,
a LoRA its factors); an evicted expert stays listed and loads again when asked for. No path may leave
the experts folder: absolute paths, ``..`` and symlinks that resolve outside are refused.

Whatever holds state derived from a loaded expert subscribes with :meth:`ExpertRegistry.add_unload_listener`
and is told the expert's name the moment it is unloaded, evicted or replaced by a reload: ``create_app``
connects the engine's prefix store (``prefix_store.forget``), so an unloaded expert's cached virtual-token
keys/values go with it instead of waiting for the store's own LRU.
"""

from __future__ import annotations

import glob
import logging
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.config import CONFIG_NAME
from peftkit.experts.manifest import VERSION
from peftkit.serving.lora_bank import LoraBank
from peftkit.serving.sources import BankSource, ExpertSpec, read_adapter_folder, read_expert_package
from peftkit.serving.types import ServedExpert, UnknownExpert

__all__ = ["ExpertRegistry"]

BASE = "base"

logger = logging.getLogger(__name__)


class PathRefusedError(ValueError):
    """A path that would make the server read outside its experts folder."""


@dataclass(slots=True)
class _Entry:
    """A loaded expert. Bank experts start without ``expert`` (made from the bank row on first use)."""

    name: str
    source: str
    version: int
    nbytes: int
    kind: str
    expert: ServedExpert | None = None
    bank: BankSource | None = None
    row: int = -1
    lora: bool = False


class ExpertRegistry:
    """Experts by name, loaded from ``root``, under an optional memory budget (LRU eviction). Thread-safe.

    Args:
        model: the frozen base model (a Hugging Face causal LM); soft prompts are built on its geometry.
        tokenizer: its tokenizer (kept for the engine).
        root: the experts folder (``None``: nothing can be loaded; :meth:`get` knows no expert).
        lora_bank: where LoRA experts go (their slot is named after the expert); ``None`` refuses LoRAs.
        memory_budget_bytes: the most bytes loaded experts may hold (``None``: no limit).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        root: str | Path | None,
        lora_bank: LoraBank | None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        if memory_budget_bytes is not None and memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be > 0 (or None for no limit), got {memory_budget_bytes}")
        if root is not None and not Path(root).is_dir():
            raise ValueError(f"root={str(root)!r} is not a folder")
        self.model, self.tokenizer, self.lora_bank = model, tokenizer, lora_bank
        self.root = Path(root).resolve() if root is not None else None
        self.memory_budget_bytes = memory_budget_bytes
        self.load_errors: dict[str, str] = {}
        self._lock = threading.RLock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # loaded, least recently used first
        self._known: dict[str, tuple[str, str]] = {}  # every expert ever read: name -> (source, kind)
        self._sources: dict[str, set[str]] = {}  # source -> the names it holds
        self._banks: dict[str, tuple[BankSource, int, int]] = {}  # source -> (bank, version, rows loaded)
        self._used = 0
        self._version = 0
        self._unload_listeners: list[Callable[[str], None]] = []

    def add_unload_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(name)`` whenever expert ``name`` leaves memory: :meth:`unload`, LRU eviction, or a
        reload that replaces it (its new version is not yet loaded when the listener runs).

        Listeners run in the thread that unloads, under the registry's lock: keep them short and never wait
        there on another thread that uses the registry. One that raises is logged and does not stop the
        unload. Adding the same listener twice registers it once.
        """
        with self._lock:
            if listener not in self._unload_listeners:
                self._unload_listeners.append(listener)

    # ------------------------------------------------------------------ lookup
    def get(self, name: str) -> ServedExpert:
        """The expert ``name``, loading it from the experts folder if needed (an O(1) lookup once loaded).

        Raises:
            UnknownExpert: no such expert is loaded or on disk.
        """
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                entry = self._load_on_demand(name)
            self._entries.move_to_end(name)
            if entry.expert is None:
                assert entry.bank is not None
                prompt = entry.bank.soft_prompt(entry.row)
                entry.expert = ServedExpert(name, entry.version, prompt, source=entry.source, nbytes=entry.nbytes)
            return entry.expert

    def resolve(self, name: str, fallback: Sequence[str] = ()) -> tuple[ServedExpert | None, str]:
        """The first known of ``[name, *fallback]`` and the level that served it; ``"base"`` is the bare
        model (returned as ``None``).

        Raises:
            UnknownExpert: none of them is known (the message lists what was tried).
        """
        tried = [name, *fallback]
        for level in tried:
            if level == BASE:
                return None, BASE
            try:
                return self.get(level), level
            except UnknownExpert:
                continue
        raise UnknownExpert(f"no expert {name!r} (tried {tried})")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        """The loaded experts, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes the loaded experts count against the budget."""
        return self._used

    def describe(self) -> list[dict[str, Any]]:
        """One dict per known expert (``/v1/models``): id, kind, source, loaded, bytes, version."""
        with self._lock:
            rows = []
            for name, (source, kind) in self._known.items():
                entry = self._entries.get(name)
                rows.append(
                    {
                        "id": name,
                        "kind": kind,
                        "source": source,
                        "loaded": entry is not None,
                        "bytes": entry.nbytes if entry else 0,
                        "version": entry.version if entry else None,
                    }
                )
            return rows

    # ------------------------------------------------------------------ lifecycle
    def load_all(self) -> list[str]:
        """Load every ``.expert`` file and adapter folder directly under ``root``; returns the names loaded.

        A source that fails is skipped with a warning and recorded in :attr:`load_errors` (the server starts).
        """
        if self.root is None:
            return []
        names: list[str] = []
        for child in sorted(self.root.iterdir()):
            is_expert = child.suffix == ".expert" and child.is_file()
            if child.name.startswith(".") or not (is_expert or (child / CONFIG_NAME).is_file()):
                continue
            try:
                names += self.load(child.name)
            except Exception as exc:  # one bad file must not stop the server; the message is kept
                self.load_errors[child.name] = str(exc)
                warnings.warn(f"expert source {child.name!r} not loaded: {exc}", UserWarning, stacklevel=2)
        return names

    def load(self, path: str | Path) -> list[str]:
        """(Re)load the source ``path`` (relative to ``root``); returns the names of its experts.

        Raises:
            ValueError: the path leaves the experts folder, or the source cannot be served.
            FileNotFoundError: no such file or folder under ``root``.
        """
        with self._lock:
            return self._load_source(self._inside(path))

    def unload(self, name: str) -> None:
        """Unload expert ``name`` (or every expert of the source ``name``, e.g. a bank folder).

        It stays listed by :meth:`describe` and loads again on demand.
        """
        with self._lock:
            if name in self._entries:
                self._drop(name)
                return
            loaded = [n for n in self._sources.get(name, ()) if self._known.get(n, ("",))[0] == name]
            if not loaded and name not in self._known:
                raise UnknownExpert(f"no expert or source {name!r} to unload")
            for expert in loaded:
                if expert in self._entries:
                    self._drop(expert)

    # ------------------------------------------------------------------ internals
    def _inside(self, path: str | Path) -> Path:
        """``root / path`` resolved (symlinks followed), refused unless it stays inside ``root``."""
        if self.root is None:
            raise ValueError("this registry has no experts folder (root=None): nothing can be loaded")
        text = str(path)
        relative = Path(text)
        if "\x00" in text or relative.is_absolute() or relative.anchor:
            raise PathRefusedError(f"expert path {text!r} is refused: give a path relative to the experts folder")
        if ".." in relative.parts:
            raise PathRefusedError(f"expert path {text!r} is refused: '..' may not leave the experts folder")
        try:
            resolved = (self.root / relative).resolve(strict=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"no expert file or folder {text!r} in the experts folder") from None
        if not resolved.is_relative_to(self.root):
            raise PathRefusedError(
                f"expert path {text!r} is refused: it resolves outside the experts folder (a symlink)"
            )
        return resolved

    def _check_file(self, path: Path) -> None:
        """Every file read from a folder source must itself resolve inside ``root``."""
        if not path.exists():
            raise FileNotFoundError(f"{path.name} is missing in {path.parent.name!r}")
        if self.root is None or not path.resolve(strict=True).is_relative_to(self.root):
            raise PathRefusedError(
                f"{path.name} in {path.parent.name!r} is refused: it resolves outside the experts folder"
            )

    def _find_on_disk(self, name: str) -> Path | None:
        """``root/<name>.expert``, the newest ``root/<name>-<version>.expert``, or the folder ``root/<name>/``."""
        if self.root is None or not name or "/" in name or "\\" in name or "\x00" in name or name.startswith("."):
            return None
        candidates = [self.root / f"{name}.expert"]
        versioned = []
        for path in self.root.glob(f"{glob.escape(name)}-*.expert"):
            version = path.name[len(name) + 1 : -len(".expert")]
            if VERSION.match(version):
                versioned.append((tuple(int(x) for x in re.findall(r"\d+", version)[:3]), path))
        candidates += [path for _, path in sorted(versioned, reverse=True)]
        candidates.append(self.root / name / CONFIG_NAME)
        for path in candidates:
            if path.is_file():
                try:
                    return self._inside(path.relative_to(self.root) if path.suffix == ".expert" else name)
                except PathRefusedError as exc:
                    warnings.warn(str(exc), UserWarning, stacklevel=4)
        return None

    def _load_on_demand(self, name: str) -> _Entry:
        known = self._known.get(name)
        if known is not None and known[0] in self._banks:  # evicted from a bank still in memory: reuse its row
            bank, version, count = self._banks[known[0]]
            self._banks[known[0]] = (bank, version, count + 1)
            self._add(_Entry(name, known[0], version, bank.row_nbytes, known[1], bank=bank, row=bank.experts.row(name)))
            self._evict(protect=name)
        else:
            path = self._inside(known[0]) if known is not None else self._find_on_disk(name)
            if path is None:
                raise UnknownExpert(f"no expert {name!r}")
            source = path.relative_to(self.root).as_posix()
            if known is None and name not in self._sources.get(source, (name,)):
                # already read, and it holds other experts: reading it again per request would not help
                raise UnknownExpert(f"no expert {name!r} ({source!r} holds other experts; load() it to re-read)")
            try:
                self._load_source(path, protect=name)
            except PathRefusedError as exc:  # a request never reads outside the experts folder; the operator is told
                warnings.warn(str(exc), UserWarning, stacklevel=3)
                raise UnknownExpert(f"no expert {name!r}") from None
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownExpert(f"no expert {name!r} (its source does not hold it any more)")
        return entry

    def _load_source(self, path: Path, protect: str | None = None) -> list[str]:
        assert self.root is not None
        source = path.relative_to(self.root).as_posix()
        if path.is_file() and path.suffix == ".expert":
            read: ExpertSpec | BankSource = read_expert_package(self.model, path)
        elif path.is_dir():
            read = read_adapter_folder(self.model, path, path.name, self._check_file)
        else:
            raise ValueError(f"{source!r} is neither a .expert file nor an adapter folder")
        self._version += 1
        names = read.ids if isinstance(read, BankSource) else [read.name]
        for stale in self._sources.get(source, set()) - set(names):
            if self._known.get(stale, ("",))[0] == source:
                self._forget(stale)
        self._sources[source] = set(names)
        if isinstance(read, BankSource):
            for name in names:
                self._forget(name)
            kind = read.kind if read.kind == "prefix" else "soft_prompt"
            for row, name in enumerate(names):
                self._add(_Entry(name, source, self._version, read.row_nbytes, kind, bank=read, row=row))
                self._known[name] = (source, kind)
            self._banks[source] = (read, self._version, len(names))
        else:
            self._add_spec(read, source)
        self._evict(protect)
        self.load_errors.pop(source, None)
        return names

    def _add_spec(self, spec: ExpertSpec, source: str) -> None:
        name, lora_version, lora_bytes = spec.name, 0, 0
        if spec.lora is not None:
            if self.lora_bank is None:
                raise ValueError(f"expert {name!r} has a LoRA but this registry was given no LoraBank")
            lora_version = self.lora_bank.add(name, *spec.lora)
            lora_bytes = self.lora_bank.nbytes_of(name)
        nbytes = lora_bytes + (spec.soft_prompt.nbytes if spec.soft_prompt is not None else 0)
        if self.memory_budget_bytes is not None and nbytes > self.memory_budget_bytes:
            if spec.lora is not None:
                self.lora_bank.remove(name)
            self._forget(name)
            raise ValueError(f"expert {name!r} needs {nbytes} bytes, more than memory_budget_bytes")
        if name in self._entries:
            self._drop(name, keep_lora=spec.lora is not None)
        kind = "+".join(
            [*(["prefix" if spec.soft_prompt.kind == "prefix" else "soft_prompt"] if spec.soft_prompt else [])]
            + (["lora"] if spec.lora else [])
        )
        expert = ServedExpert(
            name,
            self._version,
            spec.soft_prompt,
            lora=name if spec.lora else None,
            lora_version=lora_version,
            decoding=spec.decoding,
            source=source,
            nbytes=nbytes,
        )
        self._add(_Entry(name, source, self._version, nbytes, kind, expert=expert, lora=spec.lora is not None))
        self._known[name] = (source, kind)

    def _add(self, entry: _Entry) -> None:
        self._entries[entry.name] = entry
        self._entries.move_to_end(entry.name)
        self._used += entry.nbytes

    def _drop(self, name: str, keep_lora: bool = False) -> None:
        """Unload ``name`` (it stays known)."""
        entry = self._entries.pop(name)
        self._used -= entry.nbytes
        if entry.lora and not keep_lora and self.lora_bank is not None and name in self.lora_bank:
            self.lora_bank.remove(name)
        if entry.bank is not None:
            bank, version, count = self._banks[entry.source]
            if count <= 1:
                del self._banks[entry.source]  # the table is freed with its last loaded row
            else:
                self._banks[entry.source] = (bank, version, count - 1)
        for listener in self._unload_listeners:
            try:
                listener(name)
            except Exception:  # a cache that fails to forget must not leave the registry half-updated
                logger.exception("unload listener %r failed for expert %r", listener, name)

    def _forget(self, name: str) -> None:
        """Unload ``name`` if loaded and remove it from the listing (its source no longer holds it)."""
        if name in self._entries:
            self._drop(name)
        self._known.pop(name, None)

    def _evict(self, protect: str | None = None) -> None:
        """Evict least recently used experts until the loaded ones fit the budget."""
        if self.memory_budget_bytes is None or self._used <= self.memory_budget_bytes:
            return
        for name in list(self._entries):
            if self._used <= self.memory_budget_bytes:
                return
            if name != protect:
                self._drop(name)
