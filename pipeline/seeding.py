"""Every seed the pipeline derives, in one place: from the params' ``seed`` and hashes of names.

A derived seed depends on names (a game, a split, a purpose such as ``"crn"``), never on positions in
a list, so adding a game, a task family or a method leaves every other draw as it was.
"""

from __future__ import annotations

import hashlib

__all__ = ["derived_seed", "name_key", "variant_seed"]


def derived_seed(*parts: int | str) -> int:
    """A 31-bit seed from any tuple of ints/strings: the first 4 bytes (little-endian) of the SHA-256
    of ``"part0:part1:..."``, masked to 31 bits (stable across processes and machines)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def name_key(name: str) -> int:
    """A 31-bit key for a name (e.g. a task family) in a numpy ``SeedSequence`` spawn key."""
    return derived_seed(name)


def variant_seed(seed: int, game: str) -> int:
    """The metagrad seed of a game, shared by every variant so that variants differ only in what is
    meta-learned: ``(seed * 1_000_003 + sum_i ord(game[i]) * 31**i) mod 2**31``."""
    return (seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(game))) % 2**31
