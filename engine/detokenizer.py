"""Incremental detokenization of one generated sequence, with stop strings.

Decoding every token on its own breaks byte-level BPE: an emoji or CJK character is often split
over several tokens, each of which decodes to U+FFFD alone. Re-decoding the whole output every
step is correct but O(n) per token. Instead we keep a small window of token ids:

    ids:  ... | prefix_offset ........ read_offset ........ end |
                 (already emitted, kept as context)  (new tokens)

and emit `decode(ids[prefix:]) minus decode(ids[prefix:read])`. While the window's text ends in
U+FFFD the new tokens hold an incomplete character, so we wait for more tokens. Once text is
emitted the window slides forward, so each step decodes a few tokens: O(1) per token.
"""
from __future__ import annotations

from engine.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context before the first output token. Tokenizers whose decoding of a
# token depends on its neighbours (SentencePiece drops a leading space at the start) need it.
PROMPT_CONTEXT_TOKENS = 4
# A UTF-8 character has at most 4 bytes and every token carries at least one, so a window that
# still ends in U+FFFD after this many new tokens holds genuinely invalid bytes: emit them.
MAX_PENDING_TOKENS = 6
# An emitted-but-empty token (a skipped special token) does not slide the window's start; this
# bounds how much context the window keeps in that case.
MAX_CONTEXT_TOKENS = 8


class IncrementalDetokenizer:
    """Turns the generated tokens of one sequence into text, one token at a time.

    Guarantees: once all tokens are in and `stream_delta(finished=True)` has been called, the
    concatenated stream deltas equal `output_text`, which equals
    `tokenizer.decode(output_ids, skip_special_tokens=...)` cut at the earliest stop string
    (kept when `include_stop_str_in_output`). Deltas never contain U+FFFD from a character
    split across tokens, and never contain any part of a stop string that later matches.
    Stop strings are not looked for while fewer than `min_tokens` tokens were generated.

    Callers add only the tokens whose text belongs to the output (an engine that stops on a
    stop token id or eos simply does not add it, or adds eos, which is skipped as special).
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids: list[int] = []  # the output tokens added so far
        self.stop_reason: str | None = None  # the stop string that matched, once one has
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # the prompt ends mid-character: its bytes are not ours to complete
        self._ids = context  # window context + all output ids; offsets index into it
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""
        self._sent = 0  # how much of _text stream_delta has handed out
        # sees every character of _text once, in order, so its positions index into _text
        self._stops = params.stop_matcher()

    @property
    def output_text(self) -> str:
        """All text decoded so far, cut at a matched stop string. Tokens holding the start of
        a still-incomplete character are not in it yet."""
        return self._text

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def add_token(self, token_id: int) -> str | None:
        """Appends one generated token. Returns the stop string if one completes now (the text
        is then cut at it), else None. Adding after a stop string matched is an error."""
        if self.stopped:
            raise RuntimeError(f"add_token called after stop string {self.stop_reason!r} matched")
        self.token_ids.append(token_id)
        self._ids.append(token_id)
        return self._append_text(self._decode_new(flush=False))

    def stream_delta(self, finished: bool) -> str:
        """Text not handed out by earlier calls. While not finished (and no stop string has
        matched) it holds back a tail that could still become a stop string; when finished it
        first decodes any held-back incomplete character (as U+FFFD, like a full decode)
        and then releases everything."""
        if finished and not self.stopped and self._read_offset < len(self._ids):
            self._append_text(self._decode_new(flush=True))
        end = len(self._text)
        if not (finished or self.stopped) and self._stops is not None:
            end -= self._stops.held_back()
        if end <= self._sent:
            return ""
        delta = self._text[self._sent:end]
        self._sent = end
        return delta

    def _decode(self, ids: list[int]) -> str:
        # Clean-up of tokenization spaces is off: it rewrites text across token boundaries,
        # so it cannot be applied piecewise.
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _decode_new(self, flush: bool) -> str:
        """New text from the tokens past read_offset, sliding the window when there is any.
        Returns "" while they end inside a character (unless `flush`)."""
        ids, prefix, read = self._ids, self._prefix_offset, self._read_offset
        prefix_text = self._decode(ids[prefix:read])
        new_text = self._decode(ids[prefix:])
        pending = len(ids) - read
        if new_text.endswith(REPLACEMENT_CHAR) and not flush and pending < MAX_PENDING_TOKENS:
            return ""
        delta = new_text[len(prefix_text):]
        if delta:
            self._prefix_offset, self._read_offset = read, len(ids)
        else:
            # Nothing visible (e.g. a skipped special token): keep the context but stay small.
            self._read_offset = len(ids)
            self._prefix_offset = max(prefix, self._read_offset - MAX_CONTEXT_TOKENS)
        return delta

    def _append_text(self, delta: str) -> str | None:
        if not delta:
            return None
        self._text += delta
        if self._stops is None:
            return None
        # Fed even before min_tokens, so a stop string that starts earlier and ends later is
        # still found; only matches ending in this delta are new.
        hit = self._stops.feed(delta)
        if hit is None or len(self.token_ids) < self.params.min_tokens:
            return None
        index, which = hit
        stop = self.params.stop[which]
        self._text = self._text[:index + len(stop) if self.params.include_stop_str_in_output else index]
        self._sent = min(self._sent, len(self._text))
        self.stop_reason = stop
        return stop
