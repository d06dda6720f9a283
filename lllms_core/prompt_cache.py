"""The prompt cache: saved context states of one model, in host RAM and on disk.

A *state* is what an engine saved of one sequence (slot): the tokens it holds and the
engine's data for them (llama.cpp: that sequence's KV cells; transformers: its cache
object). Before the pool gives a slot to another conversation, the engine saves the
slot's state here; a later request whose prompt starts with a saved state's tokens gets
it restored into its slot instead of evaluating them again.

- **Index.** A state is found by its tokens: a chain of hashes over blocks of
  ``BLOCK`` tokens, each hash covering every block before it, so the hash of block *i*
  of a prompt names its whole prefix up to there, and the longest cached prefix of a
  prompt is the longest chain position present. It is also found by the pool's context
  key of the conversation it came from (:mod:`lllms_core.context`), because the pool
  routes a request before its prompt is tokenized.
- **RAM tier.** Bounded in bytes, least recently used out first. Shared by all slots and
  instances of the model.
- **Disk tier.** Under ``<cache dir>/prompt-cache/<model id>/<signature>/``, bounded in
  bytes, least recently used out first. ``signature`` is a digest of what a state depends
  on (the model file's sha256, the engine and its version, the context settings), so a
  state never crosses models or settings; directories of other signatures of the model
  are stale and removed. Each state is one file, written to a temporary name and renamed
  into place, ending with a checksum of everything before it; a file that does not parse,
  is truncated, fails its checksum or names another signature is deleted and never used.
  States are written when an instance is disposed (TTL, eviction, shutdown) and read
  when a request needs one, so a conversation survives its instance and a restart.

Thread safety: engines save and restore from their own threads (llama.cpp's scheduler),
the pool and the status report read from trio; one lock guards the index, and file I/O
runs outside it. File I/O blocks: call :meth:`PromptCache.attach`, :meth:`persist` and
:meth:`prefetch` in a worker thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import msgspec

from lllms_core.context import ContextKey, common_prefix

log = logging.getLogger("lllms.cache")

BLOCK = 32
"""Tokens per hashed block: a cached prefix is found when it shares at least one block."""
MAGIC = b"LLLMSKV1"
CHECKSUM_SIZE = 32
SUFFIX = ".state"
TIERS = ("ram", "disk")


def block_hashes(tokens: Sequence[int]) -> list[bytes]:
    """The chain of hashes over the whole ``BLOCK``-token blocks of ``tokens``."""
    hashes: list[bytes] = []
    previous = b""
    buffer = array("i", tokens)
    for start in range(0, len(buffer) - BLOCK + 1, BLOCK):
        previous = hashlib.blake2b(previous + buffer[start : start + BLOCK].tobytes(), digest_size=12).digest()
        hashes.append(previous)
    return hashes


def signature_digest(signature: dict[str, Any]) -> str:
    return hashlib.blake2b(msgspec.json.encode(signature, order="sorted"), digest_size=10).hexdigest()


@dataclass(eq=False)
class CachedState:
    """One saved state. ``data`` is None while it is only on disk; ``path`` is None while
    it is only in RAM."""

    tokens: tuple[int, ...]
    key: ContextKey
    size: int
    data: Any = None
    path: Path | None = None
    last_used: float = field(default_factory=time.monotonic)
    persistent: bool = True
    """Whether the data is bytes that may go to disk (an engine's live objects may not)."""
    loaded_from_disk: bool = False
    """Read from disk for a request that has not restored it yet (its restore counts for the disk tier)."""
    hashes: list[bytes] = field(default_factory=list)


@dataclass
class TierStats:
    bytes: int = 0
    entries: int = 0
    hits: int = 0
    misses: int = 0
    restores: int = 0
    tokens_saved: int = 0

    def report(self) -> dict[str, int]:
        return {
            "bytes": self.bytes,
            "entries": self.entries,
            "hits": self.hits,
            "misses": self.misses,
            "restores": self.restores,
            "tokens_saved": self.tokens_saved,
        }


class _Header(msgspec.Struct):
    signature: str
    tokens: bytes
    """The tokens as int32, native order."""
    key: list[str]
    size: int


class PromptCache:
    """The saved states of one model. ``ram_bytes``/``disk_bytes``: the tiers' bounds (0
    turns a tier off). ``directory``: where the model's disk tier lives; the tier starts
    once :meth:`attach` names the signature of the states."""

    def __init__(self, model_id: str, *, ram_bytes: int, disk_bytes: int, directory: Path | None):
        self.model_id = model_id
        self.ram_limit = ram_bytes
        self.ram_ceiling: int | None = None
        """Set by the server: the RAM tier holds at most this for now, when the server's memory
        budget leaves it less room than ``ram_limit``."""
        self.disk_limit = disk_bytes if directory is not None else 0
        self.root = directory
        self.directory: Path | None = None
        self.signature: str | None = None
        self._lock = threading.RLock()
        self._entries: set[CachedState] = set()
        self._by_block: dict[bytes, set[CachedState]] = {}
        self._by_key: dict[str, set[CachedState]] = {}
        self.stats = {tier: TierStats() for tier in TIERS}

    # --- the disk tier ------------------------------------------------------------------

    @property
    def on_disk(self) -> bool:
        return self.directory is not None

    def attach(self, signature: dict[str, Any]) -> None:
        """Start the disk tier for states of ``signature``: index the files saved for it,
        drop what is stale or broken (blocking: run it in a worker thread). Attaching the
        same signature again does nothing; another one first forgets every state."""
        if self.root is None or not self.disk_limit:
            return
        digest = signature_digest(signature)
        with self._lock:
            if digest == self.signature:
                return
            if self.signature is not None:
                log.warning("model %r: the state signature changed; forgetting its saved states", self.model_id)
                for entry in list(self._entries):
                    self._forget(entry)
            self.signature, self.directory = digest, self.root / digest
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / "signature.json").write_bytes(msgspec.json.encode(signature, order="sorted"))
        except OSError as error:
            log.warning("model %r: no disk tier for saved states (%s)", self.model_id, error)
            with self._lock:
                self.directory = None
            return
        for stale in self.root.iterdir():
            if stale.is_dir() and stale.name != digest:
                log.info("model %r: removing saved states of other settings (%s)", self.model_id, stale.name)
                shutil.rmtree(stale, ignore_errors=True)
        found = 0
        for path in sorted(self.directory.glob("*" + SUFFIX), key=_mtime):
            header = self._read_header(path)
            if header is None:
                continue
            tokens = tuple(array("i", header.tokens))
            entry = CachedState(tokens=tokens, key=tuple(header.key), size=header.size, path=path,
                                last_used=time.monotonic() - (time.time() - _mtime(path)))
            with self._lock:
                self._add(entry)
            found += 1
        if found:
            log.info("model %r: %d saved states on disk", self.model_id, found, extra={"model": self.model_id})
        with self._lock:
            self._trim_disk()

    def _read_header(self, path: Path) -> _Header | None:
        """The header of a state file, or None (and the file deleted) when it is broken or stale."""
        try:
            with open(path, "rb") as file:
                head = file.read(len(MAGIC) + 4)
                if len(head) < len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
                    raise ValueError("not a state file")
                (length,) = struct.unpack("<I", head[len(MAGIC) :])
                header = msgspec.msgpack.decode(file.read(length), type=_Header)
                expected = len(MAGIC) + 4 + length + header.size + CHECKSUM_SIZE
                if os.fstat(file.fileno()).st_size != expected:
                    raise ValueError("truncated")
                if header.signature != self.signature:
                    raise ValueError("saved for other settings")
                return header
        except FileNotFoundError:
            return None
        except (OSError, ValueError, msgspec.DecodeError) as error:
            self._discard(path, error)
            return None

    def _discard(self, path: Path, reason: object) -> None:
        log.warning("model %r: dropping saved state %s: %s", self.model_id, path.name, reason,
                    extra={"model": self.model_id})
        try:
            path.unlink()
        except OSError:
            pass

    def _read(self, entry: CachedState) -> memoryview | None:
        """The data of a state from its file, checked; None (and the file gone) if it is not intact."""
        path = entry.path
        try:
            with open(path, "rb") as file:
                whole = bytearray(os.fstat(file.fileno()).st_size)
                if file.readinto(whole) != len(whole):
                    raise ValueError("truncated")
            body, checksum = memoryview(whole)[:-CHECKSUM_SIZE], whole[-CHECKSUM_SIZE:]
            if hashlib.blake2b(body, digest_size=CHECKSUM_SIZE).digest() != checksum:
                raise ValueError("checksum mismatch")
            (length,) = struct.unpack("<I", body[len(MAGIC) : len(MAGIC) + 4])
            start = len(MAGIC) + 4 + length
            header = msgspec.msgpack.decode(body[len(MAGIC) + 4 : start], type=_Header)
            if header.signature != self.signature or tuple(array("i", header.tokens)) != entry.tokens:
                raise ValueError("not the state indexed")
            if len(body) - start != entry.size:
                raise ValueError("truncated")
            return memoryview(whole)[start : start + entry.size]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, struct.error, msgspec.DecodeError) as error:
            self._discard(path, error)
            return None

    def _write(self, entry: CachedState) -> Path | None:
        directory = self.directory
        header = msgspec.msgpack.encode(
            _Header(signature=self.signature, tokens=array("i", entry.tokens).tobytes(), key=list(entry.key), size=entry.size)
        )
        name = hashlib.blake2b(array("i", entry.tokens).tobytes(), digest_size=16).hexdigest() + SUFFIX
        target = directory / name
        temporary = directory / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        checksum = hashlib.blake2b(digest_size=CHECKSUM_SIZE)
        try:
            with open(temporary, "wb") as file:
                for part in (MAGIC, struct.pack("<I", len(header)), header, entry.data):
                    file.write(part)
                    checksum.update(part)
                file.write(checksum.digest())
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except OSError as error:
            log.warning("model %r: cannot save a state to disk: %s", self.model_id, error)
            try:
                temporary.unlink()
            except OSError:
                pass
            return None
        return target

    def persist(self) -> int:
        """Write the states that are only in RAM to disk, most recently used first, as far as
        the disk tier's bound allows (blocking). Returns how many were written."""
        if not self.on_disk:
            return 0
        with self._lock:
            pending = sorted(
                (e for e in self._entries if e.path is None and e.persistent and e.data is not None),
                key=lambda e: e.last_used,
                reverse=True,
            )
        written = 0
        for entry in pending:
            with self._lock:
                if entry not in self._entries or entry.data is None or entry.size > self.disk_limit:
                    continue  # dropped meanwhile, or too big for the tier
            path = self._write(entry)
            if path is None:
                break
            with self._lock:
                if entry in self._entries:
                    entry.path = path
                    self.stats["disk"].bytes += entry.size
                    self.stats["disk"].entries += 1
                    self._trim_disk()
                    written += 1
        return written

    def _trim_disk(self) -> None:
        disk = self.stats["disk"]
        while disk.bytes > self.disk_limit:
            victim = min((e for e in self._entries if e.path is not None), key=lambda e: e.last_used, default=None)
            if victim is None:
                return
            self._drop_file(victim)
            if victim.data is None:
                self._unindex(victim)

    def _drop_file(self, entry: CachedState) -> None:
        try:
            entry.path.unlink()
        except OSError:
            pass
        entry.path = None
        self.stats["disk"].bytes -= entry.size
        self.stats["disk"].entries -= 1

    # --- saving and finding states ------------------------------------------------------

    def put(self, tokens: Sequence[int], data: Any, size: int, key: ContextKey = (), *, persistent: bool = True) -> bool:
        """Keep a state of ``tokens`` (``data`` taking ``size`` bytes). A state already held
        whose tokens start with these makes this one redundant; held states that are a
        prefix of this one are dropped. Returns whether the state was kept."""
        tokens = tuple(tokens)
        if not self.ram_limit or size > self.ram_room or len(tokens) < BLOCK:
            return False
        hashes = block_hashes(tokens)
        with self._lock:
            for entry in list(self._by_block.get(hashes[0], ())):
                if entry.tokens[: len(tokens)] == tokens:
                    entry.last_used = time.monotonic()
                    if key and not entry.key:
                        self._set_key(entry, key)
                    return False
                if tokens[: len(entry.tokens)] == entry.tokens:
                    self._forget(entry)
            entry = CachedState(tokens=tokens, key=tuple(key), size=size, data=data, persistent=persistent)
            self._add(entry, hashes)
            self.stats["ram"].bytes += size
            self.stats["ram"].entries += 1
            self._trim_ram(keep=entry)
        return True

    def lookup(self, tokens: Sequence[int], better_than: int = 0) -> tuple[CachedState, int] | None:
        """The state in RAM sharing the longest prefix with ``tokens``, if longer than
        ``better_than`` (what the engine has at hand already), and that prefix's length.
        Counts a hit or a miss."""
        with self._lock:
            found = self._best(tokens, better_than, in_ram=True)
            ram, disk = self.stats["ram"], self.stats["disk"]
            if found is None:
                ram.misses += 1
                disk.misses += 1 if self.on_disk else 0
                return None
            entry, length = found
            if entry.loaded_from_disk:
                ram.misses += 1
                disk.hits += 1
            else:
                ram.hits += 1
            entry.last_used = time.monotonic()
            return entry, length

    def restored(self, entry: CachedState, tokens: int) -> None:
        """Note that ``tokens`` of ``entry`` were restored into a slot instead of evaluated."""
        with self._lock:
            tier = self.stats["disk" if entry.loaded_from_disk else "ram"]
            entry.loaded_from_disk = False
            tier.restores += 1
            tier.tokens_saved += tokens

    def holds(self, tokens: Sequence[int]) -> bool:
        """Whether a state of these tokens (or of more that start with them) is kept."""
        hashes = block_hashes(tokens)
        if not hashes:
            return False
        tokens = tuple(tokens)
        with self._lock:
            return any(entry.tokens[: len(tokens)] == tokens for entry in self._by_block.get(hashes[-1], ()))

    def needs_read(self, tokens: Sequence[int], better_than: int = 0) -> bool:
        """Whether a state on disk, not in RAM, shares a longer prefix with ``tokens`` than
        ``better_than`` and than any state in RAM (then :meth:`prefetch` reads it)."""
        with self._lock:
            if not self.on_disk:
                return False
            best = self._best(tokens, better_than, in_ram=False)
            return best is not None and best[0].data is None

    def prefetch(self, tokens: Sequence[int], better_than: int = 0) -> bool:
        """Bring into RAM the state on disk that shares the longest prefix with ``tokens``,
        when it is longer than ``better_than`` and than any in RAM (blocking: disk I/O).
        Returns whether one was read."""
        with self._lock:
            if not self.on_disk:
                return False
            best = self._best(tokens, better_than, in_ram=False)
            if best is None or best[0].data is not None or best[0].size > self.ram_room:
                return False
            entry = best[0]
        data = self._read(entry)
        with self._lock:
            if data is None:
                if entry in self._entries:
                    entry.path = None
                    self.stats["disk"].bytes -= entry.size
                    self.stats["disk"].entries -= 1
                    if entry.data is None:
                        self._unindex(entry)
                return False
            if entry not in self._entries or entry.data is not None:
                return entry.data is not None
            entry.data, entry.loaded_from_disk = data, True
            entry.last_used = time.monotonic()
            self.stats["ram"].bytes += entry.size
            self.stats["ram"].entries += 1
            self._trim_ram(keep=entry)
            try:
                os.utime(entry.path)
            except OSError:
                pass
        return True

    def key_match(self, key: ContextKey) -> int:
        """How many leading items of the pool's context ``key`` the longest state (in RAM or
        on disk) shares: the pool compares it with its slots' contexts."""
        with self._lock:
            for position in range(len(key) - 1, -1, -1):
                if key[position] in self._by_key:
                    return position + 1
        return 0

    def label(self, tokens: Sequence[int], key: ContextKey) -> None:
        """File the state holding ``tokens`` (if any) under the pool's context ``key``."""
        hashes = block_hashes(tokens)
        if not hashes or not key:
            return
        with self._lock:
            for entry in self._by_block.get(hashes[-1], ()):
                if entry.tokens == tuple(tokens):
                    self._set_key(entry, key)

    def trim(self, ram_bytes: int) -> None:
        """Drop RAM copies, least recently used first, until at most ``ram_bytes`` are held."""
        with self._lock:
            for entry in sorted((e for e in self._entries if e.data is not None), key=lambda e: e.last_used):
                if self.stats["ram"].bytes <= ram_bytes:
                    return
                self._evict_ram(entry)

    # --- bookkeeping (under the lock) -----------------------------------------------------

    def _best(self, tokens: Sequence[int], better_than: int, *, in_ram: bool) -> tuple[CachedState, int] | None:
        hashes = block_hashes(tokens)
        best: tuple[CachedState, int] | None = None
        for position in range(len(hashes) - 1, -1, -1):
            if (position + 1) * BLOCK + BLOCK <= max(better_than, best[1] if best else 0):
                break  # shorter chains cannot beat what is found
            for entry in self._by_block.get(hashes[position], ()):
                if in_ram and entry.data is None:
                    continue
                length = common_prefix(entry.tokens, tokens)
                if length > better_than and (best is None or length > best[1] or (
                    length == best[1] and entry.last_used > best[0].last_used
                )):
                    best = (entry, length)
        if best is not None and not in_ram:
            in_memory = self._best(tokens, better_than, in_ram=True)
            if in_memory is not None and in_memory[1] >= best[1]:
                return in_memory
        return best

    def _add(self, entry: CachedState, hashes: list[bytes] | None = None) -> None:
        entry.hashes = hashes if hashes is not None else block_hashes(entry.tokens)
        self._entries.add(entry)
        for digest in entry.hashes:
            self._by_block.setdefault(digest, set()).add(entry)
        if entry.path is not None:
            self.stats["disk"].bytes += entry.size
            self.stats["disk"].entries += 1
        self._set_key(entry, entry.key)

    def _set_key(self, entry: CachedState, key: ContextKey) -> None:
        for item in entry.key:
            holders = self._by_key.get(item)
            if holders is not None:
                holders.discard(entry)
                if not holders:
                    del self._by_key[item]
        entry.key = tuple(key)
        for item in entry.key:
            self._by_key.setdefault(item, set()).add(entry)

    def _unindex(self, entry: CachedState) -> None:
        if entry not in self._entries:
            return
        self._entries.remove(entry)
        for digest in entry.hashes:
            holders = self._by_block.get(digest)
            if holders is not None:
                holders.discard(entry)
                if not holders:
                    del self._by_block[digest]
        self._set_key(entry, ())

    def _evict_ram(self, entry: CachedState) -> None:
        if entry.data is None:
            return
        entry.data = None
        entry.loaded_from_disk = False
        self.stats["ram"].bytes -= entry.size
        self.stats["ram"].entries -= 1
        if entry.path is None:
            self._unindex(entry)

    def _forget(self, entry: CachedState) -> None:
        self._evict_ram(entry)
        if entry.path is not None:
            self._drop_file(entry)
        self._unindex(entry)

    def _trim_ram(self, keep: CachedState) -> None:
        ram = self.stats["ram"]
        while ram.bytes > self.ram_room:
            victim = min(
                (e for e in self._entries if e.data is not None and e is not keep), key=lambda e: e.last_used, default=None
            )
            if victim is None:
                return
            self._evict_ram(victim)

    # --- reports ----------------------------------------------------------------------------

    @property
    def ram_bytes(self) -> int:
        return self.stats["ram"].bytes

    @property
    def ram_room(self) -> int:
        """Bytes the RAM tier may hold now."""
        return self.ram_limit if self.ram_ceiling is None else min(self.ram_limit, self.ram_ceiling)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "ram": {**self.stats["ram"].report(), "limit_bytes": self.ram_limit},
                "disk": {**self.stats["disk"].report(), "limit_bytes": self.disk_limit if self.on_disk else 0},
            }


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def model_file_digest(path: Path, verified=None) -> str:
    """The sha256 of a model file (blocking). ``verified``: the store's
    :class:`lllms_core.downloads.VerificationCache`, which remembers it by size and
    modification time, so that a file is hashed once."""
    from lllms_core.downloads import hash_file

    path = Path(path)
    stat = path.stat()
    known = verified.digests(path, stat) if verified is not None else {}
    if "sha256" not in known:
        known = {"sha256": hash_file(path, ["sha256"])["sha256"].hexdigest()}
        if verified is not None:
            verified.remember(path, stat, known)
    return known["sha256"]
