"""The two pools prefix caching keeps: KV blocks shared by reference count, and GDN state snapshots.

Both keep entries whose content is known (registered under a block hash) after their last user leaves, and give
them up least recently used first when an entry is needed: cached entries always yield before a running sequence
would be preempted, since a pool counts them as free.
"""

from __future__ import annotations

from collections import OrderedDict

from hylo.engine.cache import FreeList


class CachedBlocks:
    """KV blocks with FreeList's interface (take, give, num_free, size) plus sharing: `give` drops one reference,
    and a registered block without references stays findable until `take` needs it."""

    def __init__(self, size: int):
        self.size = size
        self.free = FreeList(size)
        self.refs = [0] * size
        self.hash_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced: least recently used first

    @property
    def num_free(self) -> int:
        return self.free.num_free + len(self.idle)

    @property
    def num_cached(self) -> int:
        return len(self.block_of)

    def take(self, n: int) -> list[int] | None:
        """n blocks (one reference each), evicting idle cached blocks when too few are free; None if n cannot be had."""
        if n > self.num_free:
            return None
        while self.free.num_free < n:
            block, _ = self.idle.popitem(last=False)
            del self.block_of[self.hash_of.pop(block)]
            self.free.give([block])
        ids = self.free.take(n)
        for block in ids:
            self.refs[block] = 1
        return ids

    def give(self, ids: list[int]) -> None:
        """Drop one reference to each block. A sequence's last blocks go idle first, so they are evicted before the
        prefix they extend (which more sequences are likely to share)."""
        for block in reversed(ids):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.idle[block] = None
                else:
                    self.free.give([block])

    def share(self, ids: list[int]) -> None:
        """One more reference to each (cached) block."""
        for block in ids:
            if self.refs[block] == 0:
                del self.idle[block]
            self.refs[block] += 1

    def lookup(self, key: bytes) -> int | None:
        return self.block_of.get(key)

    def register(self, block: int, key: bytes) -> None:
        """`block` (fully computed, referenced) holds the KV that `key` names; a key already cached keeps its block,
        and this one stays private to its sequence."""
        if key not in self.block_of and block not in self.hash_of:
            self.block_of[key] = block
            self.hash_of[block] = key


class SnapshotPool:
    """Entries of the snapshot tensors, each holding every GDN layer's conv window and recurrent state at one block
    boundary, found by that block's hash. An entry is copied into a sequence's state slot when it is admitted (before
    that step's forward), so none is held by a sequence it was restored into: all registered entries are evictable.
    The one entry a decoding sequence may hold (its rolling snapshot, not registered yet) is `PrefixCache`'s to give
    back or take away."""

    def __init__(self, size: int):
        self.size = size
        self.free = FreeList(size)
        self.entry_of: OrderedDict[bytes, int] = OrderedDict()  # least recently used first

    @property
    def num_used(self) -> int:
        return self.size - self.free.num_free

    def lookup(self, key: bytes) -> int | None:
        entry = self.entry_of.get(key)
        if entry is not None:
            self.entry_of.move_to_end(key)
        return entry

    def take(self) -> int | None:
        """An entry to write a snapshot into (the least recently used one if none is free); None if every entry is
        being written this step."""
        if not self.free.num_free:
            if not self.entry_of:
                return None
            _, entry = self.entry_of.popitem(last=False)
            return entry
        return self.free.take(1)[0]

    def give(self, entry: int) -> None:
        """A taken entry that will not be registered is free again."""
        self.free.give([entry])

    def register(self, key: bytes, entry: int) -> None:
        """The step has written `entry`: findable from now on (or freed, if another entry took the key meanwhile)."""
        if key in self.entry_of:
            self.free.give([entry])
        else:
            self.entry_of[key] = entry
