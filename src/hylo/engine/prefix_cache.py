"""Prefix caching for a hybrid model: which cached KV blocks and GDN snapshot a new sequence resumes from, where its
own snapshots are taken, and what a step made findable. Books only: the workers copy (`StepInput`'s snapshot
restores and saves), the pools hold the ids.

A sequence resumes at the longest block boundary p that has both its KV blocks (all of them, up to p) and a GDN
snapshot at exactly p, with p below its last token (whose logits are needed, so at least one token is computed).
Snapshots are taken where a later sequence is likely to want one (docs/architecture.md says why):
  - every `interval` tokens, on a grid from position 0 (a long shared prefix is resumed at most `interval` tokens
    short of its end, by every later sequence, whoever computed it first);
  - the branch point: the end of the cached KV a sequence matched, when it lies beyond the snapshot it resumed from
    (another sequence computed these blocks, so the prefix is shared: later sequences resume exactly there);
  - the last block boundary before its last token (a repeat of the prompt).
A prefill chunk ends at each of these points, since the kernels give the state only at the end of a chunk.
Besides, a step that samples (a decode step, or a prompt's last chunk) and ends at a block boundary saves the state
into the one entry its sequence holds, its rolling snapshot, in place of the one it held before; when the sequence
finishes by EOS, a stop or its length, that entry is published under its boundary's key: the next turn of a
conversation, which resends prompt and answer, resumes at most a block short of the answer's end. A snapshot of the
kinds above that finds no free or cached entry takes a rolling one (whose sequence then publishes nothing).

A waiting sequence waits, rather than compute a second time, while a running sequence is computing the first block
it does not find cached, or will snapshot a point beyond the snapshot it would resume from: requests that arrive
together with one system prompt compute it once, not once each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hylo.engine.block_hash import extend_hashes
from hylo.engine.cache import CachePlan
from hylo.engine.cached_pools import CachedBlocks, SnapshotPool
from hylo.engine.sequence import Sequence
from hylo.state import CacheShapes


def snapshot_interval(shapes: CacheShapes, block_size: int, dtype: torch.dtype) -> int:
    """Tokens between grid snapshots: the fewest whose KV outweighs one snapshot, rounded up to a power-of-two number
    of blocks, so that grid snapshots take less memory than the KV they make reusable (and common prompt lengths,
    which are often powers of two, sit on the grid)."""
    per_token = shapes.block_bytes(block_size, dtype) / block_size
    blocks = shapes.slot_bytes(dtype) / max(per_token, 1) / block_size
    return block_size * 2 ** max(0, math.ceil(math.log2(max(blocks, 1))))


@dataclass
class Track:
    """One sequence's cache books, from the first time the queue looks at it until it gives back its blocks."""

    seed: bytes  # its adapter's hash-chain start
    hashes: list[bytes] = field(default_factory=list)  # keys of its first full blocks
    matched: int = 0  # while waiting: leading blocks found cached when last looked
    registered: int = 0  # leading blocks already findable (resumed from, or registered after computing)
    computing: int = 0  # once admitted: blocks registered..computing-1 are announced as being computed
    snapshots_ahead: list[tuple[int, bytes]] = field(default_factory=list)  # (position, key) of announced snapshots
    stops: list[int] = field(default_factory=list)  # branch point, last boundary, while ahead: snapshots off the grid
    rolling: int | None = None  # the snapshot entry it holds (not registered): the state at position `rolled`
    rolled: int = 0


class PrefixCache:
    def __init__(self, blocks: CachedBlocks, snapshots: SnapshotPool, block_size: int, interval: int):
        self.blocks = blocks
        self.snapshots = snapshots
        self.block_size = block_size
        self.interval = interval
        self.tracks: dict[Sequence, Track] = {}
        self.pending: list[tuple[bytes, int]] = []  # (key, entry) snapshots this step writes
        self.rolling: dict[int, Track] = {}  # entry → books of the sequence holding it, least recently saved first
        self.writing: set[int] = set()  # rolling entries this step writes (none may be taken from its holder)
        # key → running sequences that will compute that block of their prompt / snapshot the state at its end
        self.blocks_ahead: dict[bytes, int] = {}
        self.snapshots_ahead: dict[bytes, int] = {}
        self.queries = 0  # tokens of admitted sequences that looked for a cached prefix (vLLM's prefix_cache_queries)
        self.hits = 0  # of those, tokens resumed from the cache (prefix_cache_hits)

    @staticmethod
    def for_plan(plan: CachePlan, shapes: CacheShapes, block_size: int, dtype: torch.dtype) -> PrefixCache:
        return PrefixCache(CachedBlocks(plan.num_blocks), SnapshotPool(plan.num_snapshots), block_size,
                           snapshot_interval(shapes, block_size, dtype))

    def waits(self, seq: Sequence, seed: bytes) -> bool:
        """Whether `seq` (waiting) should stay waiting: a running sequence is computing the first block of it that is not
        cached, or will snapshot a point past the snapshot it would resume from, up to its cached blocks."""
        track = self._track(seq, seed)
        resumable = (seq.num_tokens - 1) // self.block_size
        while track.matched < resumable and self.blocks.lookup(track.hashes[track.matched]) is not None:
            track.matched += 1
        if track.matched < resumable and track.hashes[track.matched] in self.blocks_ahead:
            return True
        for key in reversed(track.hashes[: track.matched]):
            if key in self.snapshots.entry_of:
                return False
            if key in self.snapshots_ahead:
                return True
        return False

    def admit(self, seq: Sequence, seed: bytes, use_hits: bool) -> int | None:
        """Start `seq`'s books (it holds no blocks, nothing computed). With `use_hits`, it takes the cached blocks of its
        longest resumable prefix and its num_computed moves there; the snapshot entry to restore into its slot, or None."""
        bs = self.block_size
        track = self._track(seq, seed)
        resumable = (seq.num_tokens - 1) // bs  # full blocks before the last token
        matched = 0
        while matched < resumable and self.blocks.lookup(track.hashes[matched]) is not None:
            matched += 1
        resumed, entry = 0, None
        if use_hits:
            for j in range(matched, 0, -1):
                entry = self.snapshots.lookup(track.hashes[j - 1])
                if entry is not None:
                    resumed = j
                    break
            seq.block_ids = [self.blocks.lookup(h) for h in track.hashes[:resumed]]
            self.blocks.share(seq.block_ids)
            seq.num_computed = resumed * bs
        track.registered = resumed
        track.computing = resumable
        _add(self.blocks_ahead, track.hashes[resumed:resumable], +1)
        track.stops = sorted({p for p in (matched * bs, resumable * bs) if p > resumed * bs})
        grid = range((resumed * bs // self.interval + 1) * self.interval, resumable * bs + 1, self.interval)
        track.snapshots_ahead = [(p, track.hashes[p // bs - 1]) for p in sorted({*track.stops, *grid})]
        _add(self.snapshots_ahead, [key for _, key in track.snapshots_ahead], +1)
        return entry

    def _track(self, seq: Sequence, seed: bytes) -> Track:
        """`seq`'s books, made on first sight with the keys of its full blocks before its last token (made again if its
        adapter was read again meanwhile)."""
        track = self.tracks.get(seq)
        if track is None or track.seed != seed:
            track = self.tracks[seq] = Track(seed)
            extend_hashes(track.hashes, seed, seq, (seq.num_tokens - 1) // self.block_size, self.block_size)
        return track

    def count(self, seq: Sequence) -> None:
        """`seq` was admitted with what `admit` found: count its query and hit."""
        self.queries += seq.num_tokens
        self.hits += seq.num_computed

    def chunk(self, seq: Sequence, n: int) -> int:
        """`n` tokens to compute from num_computed, cut at the next snapshot point, and, when the chunk ends inside the
        sequence's known tokens, ended at a block boundary if one lies inside it (so that later chunks stay aligned)."""
        start, end, bs = seq.num_computed, seq.num_computed + n, self.block_size
        next_grid = (start // self.interval + 1) * self.interval
        end = min([end, next_grid] + [p for p in self.tracks[seq].stops if start < p])
        if end < seq.num_tokens and end % bs and end - end % bs > start:
            end -= end % bs
        return end - start

    def plan_snapshot(self, seq: Sequence, n: int) -> int | None:
        """The snapshot entry to write `seq`'s state into once the step computes its next `n` tokens, if that ends at a
        block boundary that has no snapshot yet and is a snapshot point or sampled from (its rolling snapshot), and an
        entry can be had."""
        track, end, bs = self.tracks[seq], seq.num_computed + n, self.block_size
        kept = end % self.interval == 0 or end in track.stops
        if end % bs or not (kept or end == seq.num_tokens):
            return None
        track.stops = [p for p in track.stops if p > end]
        extend_hashes(track.hashes, track.seed, seq, end // bs, bs)
        key = track.hashes[end // bs - 1]
        self._drop_rolling(track)  # the state at an earlier boundary, which this one supersedes
        if key in self.snapshots.entry_of:
            return None
        if not kept:
            return self._roll(track, end)
        entry = self.snapshots.take()
        if entry is None:
            entry = self._take_rolling()
        if entry is not None:
            self.pending.append((key, entry))
        return entry

    def _take_rolling(self) -> int | None:
        """No entry is free or cached: the least recently saved rolling one that this step does not write, taken from
        the sequence holding it (which then publishes nothing, unless it saves again), or None."""
        entry = next((e for e in self.rolling if e not in self.writing), None)
        if entry is not None:
            self.rolling.pop(entry).rolling = None
        return entry

    def _roll(self, track: Track, end: int) -> int | None:
        """`track`'s rolling snapshot at `end`: a free or cached entry (its own was just given back, so one is free
        unless it held none), never another sequence's rolling one."""
        entry = self.snapshots.take()
        if entry is not None:
            track.rolling, track.rolled = entry, end
            self.rolling[entry] = track
            self.writing.add(entry)
        return entry

    def _drop_rolling(self, track: Track) -> None:
        if track.rolling is not None:
            del self.rolling[track.rolling]
            self.snapshots.give(track.rolling)
            track.rolling = None

    def computed(self, seqs: list[Sequence]) -> None:
        """After a step ran (num_computed advanced): its snapshots and each sequence's newly full blocks become findable."""
        for key, entry in self.pending:
            self.snapshots.register(key, entry)
        self.pending = []
        self.writing.clear()
        bs = self.block_size
        for seq in seqs:
            track = self.tracks[seq]
            full = seq.num_computed // bs
            extend_hashes(track.hashes, track.seed, seq, full, bs)
            for j in range(track.registered, full):
                self.blocks.register(seq.block_ids[j], track.hashes[j])
            _add(self.blocks_ahead, track.hashes[track.registered : min(full, track.computing)], -1)
            track.registered = max(track.registered, full)
            passed = [key for p, key in track.snapshots_ahead if p <= seq.num_computed]
            _add(self.snapshots_ahead, passed, -1)
            del track.snapshots_ahead[: len(passed)]

    def forget(self, seq: Sequence, publish: bool = False) -> None:
        """`seq` gave back its blocks and slot (finished, aborted or preempted), or left the queue: what it announced
        is withdrawn, and its rolling snapshot is published (`publish`: it finished by EOS, a stop or its length, after
        the step that wrote it) or given back."""
        track = self.tracks.pop(seq, None)
        if track is not None:
            _add(self.blocks_ahead, track.hashes[track.registered : track.computing], -1)
            _add(self.snapshots_ahead, [key for _, key in track.snapshots_ahead], -1)
            if publish and track.rolling is not None:
                del self.rolling[track.rolling]
                self.snapshots.register(track.hashes[track.rolled // self.block_size - 1], track.rolling)
            else:
                self._drop_rolling(track)


def _add(counts: dict[bytes, int], keys: list[bytes], delta: int) -> None:
    for key in keys:
        counts[key] = counts.get(key, 0) + delta
        if not counts[key]:
            del counts[key]
