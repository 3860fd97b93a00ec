"""Stop-string matching on detokenized text. Pure functions over strings, so the detokenizer
(and anyone else) can match without knowing about tokens."""
from __future__ import annotations


def find_stop_string(text: str, stops: list[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest match of any stop string beginning at or after `start`, as
    (index, stop string); ties at one index go to the earlier string in `stops`. None if no
    stop string occurs. Callers pass `start` so that only new text is searched: a match that
    ends inside already-checked text was found before."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string:
    text that may still turn into a stop string once more tokens arrive, and so must not be
    streamed yet."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest
