"""PII detection and redaction: emails, phone numbers, credit cards (Luhn-checked), US SSNs and
IP addresses, on whole texts and on streams.

`redact(text)` replaces each match by a tag such as `[EMAIL]`. `StreamRedactor` gives the same
result on a stream cut into arbitrary chunks: it holds back text only from the first position
where a match could still begin and run past what has arrived (found with the `regex`
package's partial matching), and releases everything else at once. So a plain word is held
only until the next space, a digit run until it can no longer be a number, and a match that
spans chunk boundaries is never leaked in pieces.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import regex

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_HEX = r"[0-9A-Fa-f]{1,4}"
PATTERNS: dict[str, regex.Pattern] = {
    "email": regex.compile(r"(?<![\w.+%-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}"
                           r"(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}(?![A-Za-z0-9-])"),
    "credit_card": regex.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])"),
    "ssn": regex.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"),
    "phone": regex.compile(r"(?<![\w+-])(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-]?)\d{3}[ .-]?\d{4}"
                           r"(?![\w-])"),
    "ip_address": regex.compile(rf"(?<![\w.:])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w.]?\d)|"
                                rf"(?<![\w:])(?:{_HEX}:){{7}}{_HEX}(?![\w:])|"
                                rf"(?<![\w:])(?:{_HEX}:){{1,6}}:(?:{_HEX}(?::{_HEX}){{0,5}})?(?![\w:])"),
}
TAGS = {"email": "[EMAIL]", "credit_card": "[CREDIT_CARD]", "ssn": "[SSN]", "phone": "[PHONE]",
        "ip_address": "[IP_ADDRESS]"}
_PRIORITY = ("email", "ssn", "credit_card", "phone", "ip_address")  # ties: the earlier wins


def luhn_ok(number: str) -> bool:
    digits = [int(d) for d in number if d.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str


def find(text: str, kinds: tuple[str, ...], pos: int = 0) -> list[Span]:
    """Non-overlapping PII spans in text[pos:] (text before pos is context for lookbehinds):
    per kind leftmost matches, then across kinds the earliest (then longest) wins."""
    spans = []
    for kind in kinds:
        for m in PATTERNS[kind].finditer(text, pos):
            if kind != "credit_card" or luhn_ok(m.group()):
                spans.append(Span(m.start(), m.end(), kind))
    spans.sort(key=lambda s: (s.start, -(s.end - s.start), _PRIORITY.index(s.kind)))
    chosen: list[Span] = []
    for s in spans:
        if not chosen or s.start >= chosen[-1].end:
            chosen.append(s)
    return chosen


def _apply(text: str, spans: list[Span], start: int, end: int) -> str:
    out, at = [], start
    for s in spans:
        out.append(text[at:s.start])
        out.append(TAGS[s.kind])
        at = s.end
    out.append(text[at:end])
    return "".join(out)


def redact(text: str, kinds: tuple[str, ...] = tuple(TAGS)) -> tuple[str, int]:
    """(text with every match replaced by its tag, number of replacements)."""
    spans = find(text, kinds)
    return _apply(text, spans, 0, len(text)), len(spans)


@dataclass
class StreamRedactor:
    """Feed raw chunks in order; each call returns the redacted text that is now safe to
    release. Concatenating all returns equals `redact(whole text)` (after `final=True`)."""

    kinds: tuple[str, ...] = tuple(TAGS)
    redactions: int = 0
    _pending: str = ""  # raw text not yet released
    _context: str = field(default="")  # the last released raw character, for lookbehinds

    def feed(self, chunk: str, final: bool = False) -> str:
        text = self._context + self._pending + chunk
        base = len(self._context)
        spans = find(text, self.kinds, base)
        hold = len(text) if final else self._hold(text, base)
        for s in spans:  # never cut a match in two
            if s.start < hold < s.end:
                hold = s.start
        done = [s for s in spans if s.end <= hold]
        self.redactions += len(done)
        released = _apply(text, done, base, hold)
        self._pending = text[hold:]
        if hold > base:
            self._context = text[hold - 1]
        return released

    def _hold(self, text: str, base: int) -> int:
        """The first position from which some pattern could still match up to the end."""
        for pos in range(base, len(text)):
            if any(PATTERNS[k].fullmatch(text, pos, partial=True) for k in self.kinds):
                return pos
        return len(text)
