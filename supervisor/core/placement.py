"""Which model each core group runs: the default everywhere, another one where a request
asks for it, and back to the default once that one has been idle `keep_alive_s` (the
server's --keep-alive, or what the last request admitted for that model asked for in its
own `keep_alive_s`: 0, at the next placement once idle; -1, never for being idle).

A core group always has a model it should run (its *assignment*); the pool spawns a
worker of that model there. A request for a model that no group runs takes one: a group
whose worker holds no job and whose model nobody waits for, of the least recently used
model. While `max_loaded` models are loaded, only a whole idle model makes room: all its
groups change at once. A model whose worker failed to load is refused for
FAILED_MODEL_RETRY_S instead of being loaded again in a loop. The placement only
decides; the supervisor's loop asks it once per turn and tells the pool.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

log = logging.getLogger("llmsup.supervisor")

FAILED_MODEL_RETRY_S = 60.0  # a model that failed to load is refused this long


@dataclass(frozen=True)
class Move:
    """Give core group `group` to `model` (its current worker drains first)."""

    group: int
    model: str
    why: str


class Placement:
    def __init__(
        self,
        models: Collection[str],
        default: str,
        groups: int,
        *,
        keep_alive_s: float,
        max_loaded: int,
    ):
        self.models = list(models)
        self.default = default
        self.assignment = [default] * groups  # the model each core group should run
        self.keep_alive_s = keep_alive_s
        self.max_loaded = max(1, max_loaded)
        self.last_used: dict[str, float] = {}
        self.keep_for: dict[str, float] = {}  # model -> its last request's keep_alive_s
        self.failed: dict[str, tuple[str, float]] = {}  # model -> (llama.cpp's reason, until)

    def loaded(self) -> set[str]:
        return set(self.assignment)

    def used(self, model: str, now: float) -> None:
        self.last_used[model] = now

    def asked_keep_alive(self, model: str, keep_alive_s: float | None) -> None:
        """A request for `model` was admitted: its keep_alive_s (None: the server's) holds
        until the next request for that model says otherwise, as Ollama's keep_alive does."""
        if keep_alive_s is None:
            self.keep_for.pop(model, None)
        else:
            self.keep_for[model] = keep_alive_s

    def keep_alive(self, model: str) -> float:
        """Seconds `model` stays loaded unused (math.inf: until another model needs it)."""
        keep = self.keep_for.get(model, self.keep_alive_s)
        return math.inf if keep < 0 else keep

    def failure(self, model: str, now: float) -> str | None:
        """Why `model` is refused now (it failed to load a moment ago), or None."""
        entry = self.failed.get(model)
        if entry is None:
            return None
        reason, until = entry
        if now >= until:
            del self.failed[model]
            return None
        return reason

    def load_failed(self, model: str, reason: str, now: float) -> None:
        """Its worker could not load it: refuse it for a while, give its groups back."""
        self.failed[model] = (reason, now + FAILED_MODEL_RETRY_S)
        for group, assigned in enumerate(self.assignment):
            if assigned == model and model != self.default:
                self.assignment[group] = self.default

    def plan(self, now: float, waiting: set[str], idle: Callable[[int], bool]) -> list[Move]:
        """The moves to make now. `waiting`: models with queued requests; `idle(group)`:
        the group's worker is serving and holds no job (it can change model now)."""
        moves: list[Move] = []
        for model in sorted(waiting - self.loaded(), key=self.models.index):
            if self.failure(model, now) is None:
                moves += self._make_room(model, now, waiting, idle)
        moves += self._expire(now, waiting, idle)
        for move in moves:
            self.assignment[move.group] = move.model
        return moves

    def _make_room(self, model: str, now: float, waiting: set[str], idle) -> list[Move]:
        victims = [m for m in self.loaded() if m not in waiting]
        victims.sort(key=lambda m: (self.last_used.get(m, 0.0), m != self.default))
        if len(self.loaded()) < self.max_loaded:
            # Room for one more model: one idle group of the least recently used model.
            for victim in victims:
                for group in self._groups_of(victim):
                    if idle(group):
                        return [Move(group, model, f"{model} asked for; {victim} idle")]
            return []
        # At the bound: a whole model goes, all its groups idle.
        for victim in victims:
            groups = self._groups_of(victim)
            if all(idle(g) for g in groups):
                why = f"{model} asked for; {victim} idle and {self.max_loaded} model(s) loaded"
                return [Move(g, model, why) for g in groups]
        return []

    def _expire(self, now: float, waiting: set[str], idle) -> list[Move]:
        """Groups of a model other than the default, unused for keep_alive_s: default."""
        moves = []
        for group, model in enumerate(self.assignment):
            if model == self.default or model in waiting or not idle(group):
                continue
            keep = self.keep_alive(model)
            if now - self.last_used.get(model, now) >= keep:
                moves.append(Move(group, self.default, f"{model} idle {keep:g}s"))
        return moves

    def _groups_of(self, model: str) -> list[int]:
        return [g for g, m in enumerate(self.assignment) if m == model]

    def status(self, now: float) -> list[dict]:
        return [
            {
                "name": model,
                "default": model == self.default,
                "groups": self._groups_of(model),
                "idle_s": round(now - self.last_used[model], 1)
                if model in self.last_used
                else None,
                "failed": self.failure(model, now),
                # Seconds it stays loaded unused (-1: not for being idle; the default's: -1).
                "keep_alive_s": -1 if model == self.default or math.isinf(k) else k,
            }
            for model in self.models
            for k in (self.keep_alive(model),)
        ]
