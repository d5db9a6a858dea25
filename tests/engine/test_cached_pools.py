"""The prefix cache's pools: shared KV blocks by reference count with least-recently-used eviction of idle cached
blocks, and snapshot entries evicted the same way."""

from hylo.engine.cached_pools import CachedBlocks, SnapshotPool


def test_cached_blocks_outlive_their_users_until_a_block_is_needed():
    pool = CachedBlocks(4)
    a, b = pool.take(2)
    pool.register(a, b"A")
    pool.register(b, b"B")
    pool.share([a])  # a second sequence resumes from block a
    pool.give([a, b])
    assert pool.refs[a] == 1 and pool.refs[b] == 0 and pool.num_free == 3  # b is idle: cached, and counts as free
    pool.give([a])
    assert pool.lookup(b"A") == a and pool.lookup(b"B") == b and pool.num_cached == 2
    # Two free blocks, then the least recently idle ones: b went idle before a.
    assert len(pool.take(3)) == 3
    assert pool.lookup(b"B") is None and pool.lookup(b"A") == a
    assert pool.take(2) is None  # only a is left, and nothing is taken
    pool.share([a])
    assert pool.num_free == 0 and pool.take(1) is None  # a block in use is never evicted


def test_a_sequence_gives_back_its_tail_first():
    pool = CachedBlocks(3)
    blocks = pool.take(3)
    for block, key in zip(blocks, (b"0", b"01", b"012")):
        pool.register(block, key)
    pool.give(blocks)
    pool.take(1)
    assert pool.lookup(b"012") is None and pool.lookup(b"0") == blocks[0]


def test_a_key_already_cached_keeps_its_block():
    pool = CachedBlocks(2)
    first, second = pool.take(2)
    pool.register(first, b"K")
    pool.register(second, b"K")  # computed twice at once: the copy stays private and is freed, not cached
    pool.give([second])
    assert pool.lookup(b"K") == first and pool.free.num_free == 1


def test_snapshot_entries_are_evicted_least_recently_used_first():
    pool = SnapshotPool(2)
    for key in (b"x", b"y"):
        pool.register(key, pool.take())
    pool.lookup(b"x")  # x is used again: y is now the oldest
    first = pool.take()
    assert pool.lookup(b"y") is None and pool.lookup(b"x") is not None
    second = pool.take()
    assert pool.take() is None  # both entries are being written this step
    pool.register(b"z", first)
    pool.register(b"z", second)  # another entry took the key meanwhile: this one goes back
    assert pool.lookup(b"z") == first and pool.num_used == 1


def test_a_snapshot_entry_given_back_unregistered_is_free_again():
    pool = SnapshotPool(1)
    entry = pool.take()  # a decoding sequence's rolling snapshot, dropped before it is published
    assert pool.take() is None
    pool.give(entry)
    assert pool.num_used == 0 and pool.take() == entry
