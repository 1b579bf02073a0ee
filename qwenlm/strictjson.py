"""JSON from files qwenlm did not write: a key given twice is an error, not "the last wins"."""

from __future__ import annotations

from typing import Any


class DuplicateKeyError(ValueError):
    """An object names ``key`` twice; ``pos`` is where that object starts, once known."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key
        self.pos: int | None = None


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads` that refuses a repeated key."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out
