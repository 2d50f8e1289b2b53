"""Response cache of the cascade's tiers: a tier's output row per item, keyed by a digest of the
item's preprocessed input tensors and the version of the model that produced it.

The student tier caches its logits row (float32 (outputs,)) under the student version, the
teacher tier its probabilities row (float32 (classes,)) under the teacher's version string, and
the stages of an N-stage cascade theirs under their own names. Only successful model outputs
are put: degraded answers (teacher failed, busy, late, circuit open) are never cached; the caller
guarantees this. A version change means new keys: the old entries are never hit again and age
out of the LRU.
"""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..config.cache import CacheConfig

if TYPE_CHECKING:
    from .metrics import Metrics

DIGEST_SIZE = 16
# Bytes an entry costs beyond its digest and its row's data: the key tuple, the digest's bytes
# object header, the row's ndarray object and allocation, and the OrderedDict's slot and link.
# Measured with tracemalloc (CPython 3.11, numpy 1.26; 100k entries of 10 and of 77 float32s):
# 315 either way; rounded up for the dict's spare slots and the allocator's own headers.
ENTRY_OVERHEAD = 384

_MAX_VERSIONS = 64  # (tier, version) pairs whose row shapes are remembered

Key = tuple[str, str, bytes]


def digests(tensors: dict[str, np.ndarray]) -> list[bytes]:
    """One digest per row (item) of a preprocessed batch: blake2b-128 over the tensor names
    (sorted), each tensor's dtype and row shape, and each row's bytes; two rows collide only if
    byte-identical (text: input_ids + attention_mask; images: `input` float32 (C, H, W)). The
    cost is the hash's (about 1 µs per KiB of row); it releases the GIL for rows over 2 KiB."""
    names = sorted(tensors)
    if not names:
        return []
    arrays = [np.ascontiguousarray(tensors[name]) for name in names]
    n = len(arrays[0]) if arrays[0].ndim else 0
    if any(a.ndim == 0 or len(a) != n for a in arrays):
        raise ValueError("every tensor needs the same number of rows")
    if any(a.dtype.hasobject for a in arrays):
        raise TypeError("object arrays have no stable bytes to digest")
    header = repr([(name, a.dtype.str, a.shape[1:]) for name, a in zip(names, arrays, strict=True)])
    start = hashlib.blake2b(header.encode(), digest_size=DIGEST_SIZE)
    views = [(a.reshape(-1).view(np.uint8).data, a.nbytes // n if n else 0) for a in arrays]
    out = []
    for i in range(n):
        h = start.copy()
        for view, size in views:
            h.update(view[i * size : (i + 1) * size])
        out.append(h.digest())
    return out


def _entry_bytes(digest: bytes, row: np.ndarray) -> int:
    return len(digest) + row.nbytes + ENTRY_OVERHEAD


@dataclass
class TierCounts:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class ResponseCache:
    """A bounded LRU of output rows keyed by (tier, version, digest), per cascade and worker.

    Used only on the asyncio event loop thread, so it takes no locks. Bounded by
    `max_entries` and `max_bytes` (digest + row data + ENTRY_OVERHEAD per entry); the least
    recently used (put or hit) entries go first. Keeps hit/miss/eviction counts per tier in
    `counts`, and records them in `metrics` (under `cascade`) when given.
    """

    def __init__(
        self, config: CacheConfig, metrics: Metrics | None = None, cascade: str = ""
    ) -> None:
        self.config = config
        self.counts: dict[str, TierCounts] = {}
        self._metrics = metrics
        self._cascade = cascade
        self._entries: OrderedDict[Key, np.ndarray] = OrderedDict()
        # The row shape last put per (tier, version): a row of another shape under the same
        # key is stale (a model changed under an unchanged version) and is dropped on a get.
        self._shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        self._nbytes = 0
        if metrics is not None and config.enabled:
            for tier in config.tiers:
                metrics.cache(cascade, tier, 0, 0)
            self._record_size({tier: 0 for tier in config.tiers})

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def enabled_for(self, tier: str) -> bool:
        return self.config.enabled and tier in self.config.tiers

    def get_many(
        self, tier: str, version: str, keys: list[bytes]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(hits: bool (len(keys),), the hits' rows in order (hits, width) or None if none).
        The rows are a new read-only array; a hit becomes the most recently used."""
        hits = np.zeros(len(keys), dtype=bool)
        if not keys or not self.enabled_for(tier):
            return hits, None
        shape = self._shapes.get((tier, version))
        found: list[np.ndarray] = []
        stale = 0
        for i, digest in enumerate(keys):
            key = (tier, version, digest)
            row = self._entries.get(key)
            if row is None:
                continue
            if row.shape != shape:
                self._drop(key)
                stale += 1
                continue
            self._entries.move_to_end(key)
            hits[i] = True
            found.append(row)
        counts = self._counts(tier)
        counts.hits += len(found)
        counts.misses += len(keys) - len(found)
        if self._metrics is not None:
            self._metrics.cache(self._cascade, tier, len(found), len(keys) - len(found))
            if stale:
                self._record_size({})
        if not found:
            return hits, None
        rows = np.stack(found)
        rows.flags.writeable = False
        return hits, rows

    def put_many(self, tier: str, version: str, keys: list[bytes], rows: np.ndarray) -> None:
        """Stores a read-only copy of rows[i] under keys[i] (only successful model outputs),
        then evicts the least recently used entries past either bound."""
        if not keys or not self.enabled_for(tier):
            return
        if len(rows) != len(keys):
            raise ValueError(f"{len(keys)} keys for {len(rows)} rows")
        tier, version = sys.intern(tier), sys.intern(version)  # one string shared by all keys
        limit = self.config.max_bytes
        for digest, source in zip(keys, rows, strict=True):
            row = np.array(source, copy=True)
            row.flags.writeable = False
            size = _entry_bytes(digest, row)
            if size > limit:
                continue
            key = (tier, version, digest)
            self._drop(key)
            self._entries[key] = row
            self._nbytes += size
            self._shapes[tier, version] = row.shape
        if len(self._shapes) > _MAX_VERSIONS:  # versions long gone: their entries go stale
            self._shapes = {k: v for k, v in self._shapes.items() if k == (tier, version)}
        evicted: dict[str, int] = {}
        while len(self._entries) > self.config.max_entries or self._nbytes > limit:
            (name, _, digest), row = self._entries.popitem(last=False)
            self._nbytes -= _entry_bytes(digest, row)
            evicted[name] = evicted.get(name, 0) + 1
        for name, n in evicted.items():
            self._counts(name).evictions += n
        self._record_size(evicted)

    def clear(self) -> None:
        """Drops every entry (not counted as evictions); the counts stay."""
        self._entries.clear()
        self._nbytes = 0
        self._record_size({})

    def _drop(self, key: Key) -> None:
        row = self._entries.pop(key, None)
        if row is not None:
            self._nbytes -= _entry_bytes(key[2], row)

    def _counts(self, tier: str) -> TierCounts:
        counts = self.counts.get(tier)
        if counts is None:
            counts = self.counts[tier] = TierCounts()
        return counts

    def _record_size(self, evicted: dict[str, int]) -> None:
        if self._metrics is not None:
            self._metrics.cache_size(self._cascade, len(self._entries), self._nbytes, evicted)
