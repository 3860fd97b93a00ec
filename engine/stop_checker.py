"""Stop-string matching on text that arrives a little at a time.

`StopMatcher` is an Aho-Corasick automaton over one request's stop strings, fed each piece of
new text once. Per piece it does O(len(piece)) amortized work, however many or long the stop
strings are: it never re-reads earlier text and never slices the stop strings (the previous
version re-scanned a window for every stop string and tried every prefix of every stop string
on every token, which made one request with thousands of long stop strings slow down the
whole batch). It is written here rather than taken from a library because it needs two things
libraries such as `pyahocorasick` do not offer: a state that persists between pieces, and the
"longest suffix that may still become a stop string" query used to hold back streamed text.
"""
from __future__ import annotations

from collections import deque


class StopAutomaton:
    """The Aho-Corasick automaton of a list of stop strings: immutable once built, so one
    request's sequences (n > 1) share it. Building costs O(total length of the strings)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = tuple(stops)
        goto: list[dict[str, int]] = [{}]
        word = [-1]  # index of the (first) stop string ending exactly at this node
        depth = [0]
        for index, s in enumerate(self.stops):
            node = 0
            for ch in s:
                nxt = goto[node].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto[node][ch] = nxt
                    goto.append({})
                    word.append(-1)
                    depth.append(depth[node] + 1)
                node = nxt
            if word[node] == -1:
                word[node] = index
        fail = [0] * len(goto)
        # Per node, over its failure chain (itself included), the first node that ends a stop
        # string (the longest one ending here) and the depth of the first that is a proper
        # prefix of one (has children).
        longest_word = [-1] * len(goto)
        partial = [0] * len(goto)
        queue = deque([0])
        while queue:  # breadth first, so every failure target is finished before it is used
            node = queue.popleft()
            if node:
                longest_word[node] = node if word[node] != -1 else longest_word[fail[node]]
                partial[node] = depth[node] if goto[node] else partial[fail[node]]
            for ch, child in goto[node].items():
                f = fail[node]
                while f and ch not in goto[f]:
                    f = fail[f]
                fail[child] = goto[f][ch] if node and ch in goto[f] else 0
                queue.append(child)
        self.goto, self.fail, self.word, self.depth = goto, fail, word, depth
        self.longest_word, self.partial = longest_word, partial


class StopMatcher:
    """Finds stop strings in a stream of text, with the automaton of `stops` (a list of
    strings, or a prebuilt StopAutomaton to share one between sequences).

    Guarantees: `feed(piece)` reports the match with the earliest start among the matches that
    end inside `piece` (ties at one start go to the string earlier in `stops`), as
    (start, index into stops), with `start` counted in characters since the first `feed`.
    `held_back()` is the length of the longest suffix of everything fed so far that is a
    proper prefix of some stop string: text that may still turn into a stop string once more
    text arrives. Both cost O(len(piece)) amortized, resp. O(1). `steps` counts automaton
    transitions taken (for tests that check the work done).
    """

    def __init__(self, stops: "list[str] | StopAutomaton") -> None:
        self.automaton = stops if isinstance(stops, StopAutomaton) else StopAutomaton(stops)
        self.stops = self.automaton.stops
        self.steps = 0
        self._pos = 0  # characters fed so far
        self._state = 0

    def feed(self, piece: str) -> tuple[int, int] | None:
        """Consumes `piece`; returns (start, stop index) of the earliest-starting match that
        ends inside it, or None."""
        a = self.automaton
        goto, fail, longest_word = a.goto, a.fail, a.longest_word
        state, pos, steps = self._state, self._pos, 0
        best: tuple[int, int] | None = None
        for ch in piece:
            while state and ch not in goto[state]:
                state = fail[state]
                steps += 1
            state = goto[state].get(ch, 0)
            steps += 1
            hit = longest_word[state]
            if hit != -1:
                found = (pos - a.depth[hit] + 1, a.word[hit])
                if best is None or found < best:
                    best = found
            pos += 1
        self._state, self._pos = state, pos
        self.steps += steps
        return best

    def held_back(self) -> int:
        """Length of the longest suffix of the text fed so far that is a proper prefix of some
        stop string (0 when none)."""
        return self.automaton.partial[self._state]
