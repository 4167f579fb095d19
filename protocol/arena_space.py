"""Room in the context cache arena for a new state: a free entry and a first-fit gap in the
data region, evicting the least valuable entries until one opens (protocol/arena.py's
Arena has these methods; every caller holds the segment's lock)."""

from __future__ import annotations

import os

import numpy as np

from llmsup.protocol.arena_layout import FREE, VALID, WRITING


class ArenaSpace:
    """The entry table's and data region's bookkeeping, as methods of Arena."""

    entries: np.ndarray
    header: np.ndarray
    data_offset: int
    data_bytes: int

    def _free(self, index: int) -> None:
        e = self.entries[index]
        e["state"] = FREE  # first: nobody takes it from here on
        e["generation"] += 1
        e["pins"] = 0
        e["writer"] = -1
        self.header["bytes_used"] -= int(e["size"])
        self.header["entries_used"] -= 1

    def _evictable(self) -> np.ndarray:
        """Unpinned valid entries, and entries whose writer process is gone, least valuable
        first: entries that a longer one continues and that served at most one prompt (a
        chat's earlier turns: its next turn continues the newest), then the least recently
        used. A prefix that many prompts continued (a system prompt) outlives them."""
        e = self.entries
        ok = (e["state"] == VALID) & (e["pins"] == 0)
        for i in np.flatnonzero(e["state"] == WRITING):
            if not _alive(int(e["writer_pid"][i])):
                ok[i] = True
        order = np.flatnonzero(ok)
        spent = (e["continued"][order] == 1) & (e["uses"][order] <= 1)
        return order[np.lexsort((e["last_used"][order], ~spent))]

    def _free_entry(self) -> int | None:
        free = np.flatnonzero(self.entries["state"] == FREE)
        if len(free):
            return int(free[0])
        victims = self._evictable()
        if not len(victims):
            return None
        self._evict(int(victims[0]))
        return int(victims[0])

    def _evict(self, index: int) -> None:
        self._free(index)
        self.header["evictions"] += 1

    def _room(self, size: int) -> int | None:
        """Offset of a gap of `size` bytes (first fit), evicting oldest entries until one
        opens; None if pinned or unfinished entries leave no such gap."""
        while True:
            offset = self._gap(size)
            if offset is not None:
                return offset
            victims = self._evictable()
            if not len(victims):
                return None
            self._evict(int(victims[0]))

    def _gap(self, size: int) -> int | None:
        e = self.entries
        used = np.flatnonzero(e["state"] != FREE)
        spans = sorted(zip(e["offset"][used].tolist(), e["size"][used].tolist(), strict=True))
        at = self.data_offset
        for offset, length in spans:
            if offset - at >= size:
                return at
            at = max(at, offset + length)
        return at if self.data_offset + self.data_bytes - at >= size else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
