"""Where a prompt starts reading: the longest prefix some sequence already computed.

A worker keeps what its sequences read after they finish (a free sequence still holds its
KV cells until another prompt needs the room) and saves sequence states into the shared
cache arena (protocol/arena.py) where the next request will want them: at the end of a
prompt, at the end of a generation (the next turn of a chat resends it), at the end of a
chat's system prompt, and at the point where a prompt that arrived later diverges from one
being read (that one waits, then restores instead of reading the same tokens twice). A new
prompt continues from whichever is longest: a free sequence here (nothing to copy), or a
state in the arena written by any worker (restored in place, a few ms).

The last prompt token is always read again: logits are not part of a state.

Sliding-window models (Gemma 3: window 512, 15 of its 18 layers) keep only a window of
recent cells in those layers, and a saved state holds only the cells its own end still
sees. So a sequence or state that has ever held n_swa tokens or more can be continued only
at its very end (`reusable_from` = its length); one that never did can be cut back to any
prefix (`reusable_from` 0). For prefixes that several prompts share (a system prompt),
states are saved where they end: a chat's system prompt, and the point where a prompt
that found a longer shared prefix in the cache, which it could not use, diverges from it;
and a long prompt leaves checkpoints every --prefill-chunk tokens on its first read.
"""

from __future__ import annotations

import ctypes
import os
import signal

import numpy as np

from llmsup.protocol.arena import Arena, Found
from llmsup.protocol.arena_layout import HEAD_TOKENS, tokens_in_common
from llmsup.worker import faults

# A prompt waits for an earlier one being read, or saves a state where it diverges from a
# cached one, only for a shared prefix of at least this many tokens.
MIN_SHARED = 64
# A free sequence's cells are continued in place from a shared prefix this long: that costs
# nothing, unlike a copy or a restore (which need HEAD_TOKENS, as arena entries do), so a
# short prompt asked again (a retry, a benchmark) reads only its last token, as it would on
# llama-server. Shorter matches (the BOS token, a first word) are not worth reporting.
IN_PLACE_MIN = 4


class PrefixCache:
    def __init__(self, engine, arena: Arena, row: int):
        self.llama = engine.llama  # the context whose sequences it fills and saves
        self.slots = engine.slots
        self.arena = arena
        self.row = row
        self.n_swa = self.llama.n_swa
        self.ctx_key = self.llama.ctx_key
        self.chunk = engine.prefill_chunk
        self.held: dict[int, np.ndarray] = {}  # free sequence -> tokens its cells still hold
        self.peak: dict[int, int] = {}  # sequence -> most tokens it held since emptied

    # --- placing a new prompt -----------------------------------------------------------------

    def place(self, prompt: np.ndarray, free_seqs: list[int]) -> tuple[int, int, int]:
        """Choose the free sequence for a prompt and fill it with the longest cached prefix;
        returns (sequence, tokens already in it, longest prefix shared with anything
        cached, usable or not).

        llama.cpp gives each sequence a KV stream of its own and splits a batch wherever
        its sequence ids are not consecutive, into decodes of their own: a token each for
        sequences 0, 5, 6, 7 took 56.8 ms where 0-3 took 34.3 (perf/engine.py). So a
        prefix held by a free sequence is continued there only if that splits the busy
        sequences into no more runs than the lowest free one would; otherwise it goes to
        the lowest, restored from the arena or copied across (a few ms, once).
        """
        seq = min(free_seqs)
        limit = len(prompt) - 1  # the last prompt token is decoded again for its logits
        here, here_n = None, 0
        found, shared = self.arena.find(self.ctx_key, prompt, limit, self.row)
        for other in free_seqs:
            held = self.held.get(other)
            if held is None:
                continue
            common = tokens_in_common(held, prompt)
            shared = max(shared, common)
            usable = min(common, limit)
            if usable >= max(here_n + 1, IN_PLACE_MIN, self.reusable_from(other)):
                here, here_n = other, usable
        arena_n = found.usable if found is not None else 0
        busy = set(range(self.slots)).difference(free_seqs)
        if here is not None and here_n >= arena_n and runs(busy | {here}) <= runs(busy | {seq}):
            if found is not None:
                self.arena.unpin(found, self.row)
            seq, n = here, here_n
            self.cut(seq, n)
            self.arena.count("slot", n)
        elif found is not None and (arena_n >= here_n or here_n < HEAD_TOKENS):
            # (a longer prefix held elsewhere, but too short to copy, leaves the arena's)
            n = self.restore(seq, found)
            if n:
                self.arena.count("shared", n)
        elif here is not None and here_n >= HEAD_TOKENS:  # not worth a copy below that
            if found is not None:
                self.arena.unpin(found, self.row)
            n = here_n if self.copy(here, seq) else 0
            self.cut(seq, n)
            if n:
                self.arena.count("slot", n)
        else:
            n = 0
            self.forget(seq)  # a miss: counted by plan_saves, unless it waits (waiting())
        self.held.pop(seq, None)
        return seq, n, shared

    def resume(self, seq: int, prompt: np.ndarray, n_past: int) -> int:
        """A prompt that waited for another to read their common prefix: restore it now
        if that is in the arena and longer than what the sequence holds; its new n_past."""
        found, _ = self.arena.find(self.ctx_key, prompt, len(prompt) - 1, self.row)
        if found is None:
            return n_past
        if found.usable <= n_past:
            self.arena.unpin(found, self.row)
            return n_past
        return self.restore(seq, found)

    # --- prompts being read ---------------------------------------------------------------------

    def plan_saves(self, gen, running: list, system_end: int, shared: int) -> None:
        """Where a new prompt's state is saved while it is read: the end of a chat's system
        prompt; where it diverges from a cached prefix it could not continue from; and
        where it diverges from a prompt being read that it will wait for."""
        ids = gen.prompt_ids
        points = {system_end, shared}
        if self.n_swa and len(gen.prompt) > self.n_swa:
            # Checkpoints where its chunks end anyway: a long prompt's state serves only its
            # own end, and the next prompt that shares its start (a new conversation with
            # the same system prompt) then starts from the last checkpoint before they part.
            first = (gen.n_past // self.chunk + 1) * self.chunk
            points.update(range(first, len(gen.prompt) - MIN_SHARED, self.chunk))
        for at in sorted(points):
            if gen.n_past + MIN_SHARED <= at < len(gen.prompt):
                gen.save_at.append(at)
        if self.n_swa and len(gen.prompt) >= self.n_swa and gen.n_past < len(gen.prompt) - 1:
            # The same prompt again (a retry, a "regenerate") must read its last token again
            # for logits, and a state of the whole prompt cannot be cut back by one: keep
            # one of all but the last token too (its last token is then read a step later).
            gen.save_at.append(len(gen.prompt) - 1)
        best, best_at = None, gen.n_past + MIN_SHARED - 1
        for other in running:
            if not other.prefilling or other.echo:  # an echo saves nothing to wait for
                continue
            at = shared_prefix(other.prompt_ids, ids)
            if at > best_at and other.n_past < at:
                best, best_at = other, at
        if best is not None:
            gen.waiting_for = (best, best_at)
            if best_at not in best.save_at:
                best.save_at.append(best_at)
                best.save_at.sort()
        elif gen.n_past == 0:
            self.arena.count(None)

    def waiting(self, gen) -> bool:
        """Whether `gen` still waits for the prompt it shares a prefix with; once that one
        has read it (or ended), `gen` restores it from the arena and reads the rest."""
        if gen.waiting_for is None:
            return False
        other, at = gen.waiting_for
        if other.seq is not None and other.n_past < at:
            return True
        gen.waiting_for = None
        n = self.resume(gen.seq, gen.prompt_ids, gen.n_past)
        if gen.cached_tokens == 0:  # counted now that it is known
            self.arena.count("shared" if n else None, n)
        if n != gen.n_past:  # restored (or, if llama.cpp refused the state, emptied)
            gen.cached_tokens = gen.n_past = n
            gen.save_at[:] = [p for p in gen.save_at if p > n]
        return False

    def after_read(self, gen) -> None:
        """A chunk of `gen`'s prompt was read: save its state if it ends at a save point or
        at the end of the prompt."""
        if gen.save_at and gen.n_past >= gen.save_at[0]:
            del gen.save_at[0]
        elif gen.n_past != len(gen.prompt):
            return
        self.save(gen.seq, gen.prompt_ids[: gen.n_past])

    def restore(self, seq: int, found: Found) -> int:
        """Load a state from the arena into `seq`, cut back to its usable prefix; the
        tokens it holds then (0 if llama.cpp refused the state: a miss, never a crash)."""
        try:
            read = self.llama.load_state(seq, found.state_ptr, found.state_bytes)
        finally:
            self.arena.unpin(found, self.row)
        if read != found.state_bytes or self.llama.kv_tokens(seq) != found.n_tokens:
            self.forget(seq)
            return 0
        self.peak[seq] = found.n_tokens
        self.cut(seq, found.usable)
        return found.usable

    # --- saving -------------------------------------------------------------------------------

    def save(self, seq: int, tokens: np.ndarray) -> bool:
        """Write the state of `seq`, which holds `tokens`, into the arena (unless an entry
        already serves them); True if written."""
        if len(tokens) < HEAD_TOKENS:
            return False
        size = self.llama.state_size(seq)
        res = self.arena.reserve(self.ctx_key, tokens, self.reusable_from(seq), size, self.row)
        if res is None:
            return False
        if faults.cache_write_crash:
            # Tests only: die half way through the write, as a SIGKILLed worker would.
            ctypes.memset(res.state_ptr, 0xAB, size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        written = self.llama.save_state(seq, res.state_ptr, size)
        if written != size:
            self.arena.abandon(res)
            return False
        return self.arena.commit(res)

    def keep(self, seq: int, tokens: np.ndarray) -> None:
        """A sequence finished: its cells stay for the next prompt that starts the same way,
        and its state goes to the arena for every other worker (and for after it is reused)."""
        self.save(seq, tokens)
        self.held[seq] = tokens

    def forget(self, seq: int) -> None:
        self.cut(seq, 0)
        self.held.pop(seq, None)
        self.peak.pop(seq, None)

    # --- KV cells -----------------------------------------------------------------------------

    def cut(self, seq: int, n: int) -> None:
        self.llama.cut(seq, n)

    def copy(self, src: int, dst: int) -> bool:
        """Put the cells of free sequence `src` into `dst` as well (through a state: the two
        are different KV streams), for a prefix the arena does not hold; False (and `dst`
        emptied) if llama.cpp refused."""
        size = self.llama.state_size(src)
        buf = ctypes.create_string_buffer(size)
        address = ctypes.addressof(buf)
        if (
            self.llama.save_state(src, address, size) != size
            or self.llama.load_state(dst, address, size) != size
        ):
            self.forget(dst)
            return False
        self.peak[dst] = self.peak.get(src, 0)
        return True

    def copied(self, src: int, dst: int) -> None:
        """`dst` was given a copy of busy sequence `src`'s cells (a request of n completions,
        Engine.fork): it has held what `src` has."""
        self.peak[dst] = max(self.peak.get(src, 0), self.llama.kv_tokens(src))

    def reusable_from(self, seq: int) -> int:
        """Shortest prefix `seq` (and a state saved from it) can be cut back to and
        continued from: any, unless a sliding window has dropped cells it held."""
        end = self.llama.kv_tokens(seq)
        self.peak[seq] = max(self.peak.get(seq, 0), end)
        return 0 if self.n_swa == 0 or self.peak[seq] < self.n_swa else end


def runs(seqs: set[int]) -> int:
    """Runs of consecutive ids in `seqs`: the decodes llama.cpp splits their batch into."""
    return sum(1 for s in seqs if s - 1 not in seqs)


def shared_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Tokens two prompts share from the start (short of the shorter one's last)."""
    return max(0, min(tokens_in_common(a, b), len(a) - 1, len(b) - 1))
