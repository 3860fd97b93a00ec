"""`GrammarState`: one sequence's position in its grammar.

The matcher is advanced lazily: before each mask is built, `sync(output_token_ids)` makes the
matcher have accepted exactly the sequence's output tokens -- it accepts the ones it has not
seen yet and rolls back (or resets and replays) past any it saw that are no longer there. So
whatever happened to the sequence in between (a normal step, a preemption and recompute, which
keeps the output tokens, or anything that trims them), the mask always describes the next
token after the sequence's real output.

A token the grammar refuses (only possible when something other than the mask picked it, e.g.
`min_tokens` hiding the end-of-sequence token the grammar requires) leaves the state `broken`:
the sequence is no longer constrained, and the grammar never raises on the engine thread.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger("conveyor.engine")


class GrammarState:
    def __init__(self, compiled: Future):
        self.compiled = compiled
        self._matcher: Any = None
        self._accepted: list[int] = []
        self.broken = False

    def is_ready(self) -> bool:
        """True once the grammar compiled (or failed to: see `error`)."""
        return self.compiled.done()

    @property
    def error(self) -> BaseException | None:
        return self.compiled.exception() if self.compiled.done() else None

    @property
    def active(self) -> bool:
        """True when this sequence's next token must be masked."""
        return not self.broken and self.compiled.done() and self.compiled.exception() is None

    def sync(self, output_token_ids: list[int]) -> None:
        """Brings the matcher to the state after exactly `output_token_ids`."""
        if self._matcher is None:
            import xgrammar as xgr  # noqa: PLC0415

            self._matcher = xgr.GrammarMatcher(self.compiled.result())
        acc, out = self._accepted, output_token_ids
        # the usual case, checked in O(1): the output only grew since the last sync
        if len(acc) > len(out) or (acc and acc[-1] != out[len(acc) - 1]):
            common = 0
            while common < min(len(acc), len(out)) and acc[common] == out[common]:
                common += 1
            self._rewind(len(acc) - common)
        for token in output_token_ids[len(self._accepted):]:
            if self._matcher.is_terminated() or not self._matcher.accept_token(token):
                logger.warning("structured output: token %d refused by the grammar; output left unconstrained", token)
                self.broken = True
                return
            self._accepted.append(token)

    def _rewind(self, count: int) -> None:
        if count <= 0:
            return
        try:
            self._matcher.rollback(count)
            del self._accepted[len(self._accepted) - count:]
        except Exception:  # noqa: BLE001 - past the rollback window: replay from the start
            self._matcher.reset()
            self._accepted = []

    def fill(self, bitmask: Any, row: int) -> None:
        """Writes the allowed next tokens into `bitmask[row]`."""
        self._matcher.fill_next_token_bitmask(bitmask, row)
