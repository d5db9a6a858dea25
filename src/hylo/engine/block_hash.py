"""Chained block hashes: the key of a sequence's full block j covers its adapter and every token up to and including
block j, so two sequences share a key only when everything that shaped that block's KV (and the GDN state at its
end) is the same.

SHA-256 rather than Python's `hash`: a collision would hand one prompt another prompt's cache, silently.
"""

from __future__ import annotations

import array
import hashlib

from hylo.engine.sequence import Sequence

AdapterIdentity = tuple[int, str, str, int] | None  # (id, name, path, load generation); None for the base model


def adapter_seed(identity: AdapterIdentity) -> bytes:
    """The hash chain's start for one adapter: an adapter reloaded (another path, or the same path read again)
    starts another chain, so entries computed with its old weights are never found."""
    return hashlib.sha256(repr(identity).encode()).digest()


def extend_hashes(hashes: list[bytes], seed: bytes, seq: Sequence, num_blocks: int, block_size: int) -> None:
    """Append to `hashes` (the keys of `seq`'s first blocks) until it holds `num_blocks` keys."""
    for j in range(len(hashes), num_blocks):
        parent = hashes[-1] if hashes else seed
        tokens = array.array("q", seq.token_ids(j * block_size, (j + 1) * block_size)).tobytes()
        hashes.append(hashlib.sha256(parent + tokens).digest())
