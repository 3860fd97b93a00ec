"""Per-request sampling parameters, with vLLM / OpenAI semantics.

`SamplingParams` is validated in two steps. At construction, every value is checked on its own
(types, ranges); `verify(limits)` then checks it against the model and the engine's limits
(token ids below the vocabulary size, the number and size of stop strings). Every failure
raises `InvalidParameterError` (a `ValueError`) whose `param` names the field and whose message
starts with it, so an API layer can hand it straight back to the client.

Fields the model may have an opinion on (`MODEL_DEFAULTABLE`: temperature, top_p, top_k, min_p,
repetition_penalty) default to None, meaning "not set by the caller". They are filled with
neutral values at construction, and `with_defaults` replaces exactly the unset ones with the
model's recommended values (its generation_config), the way vLLM does.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.errors import InvalidParameterError, show
from engine.stop_checker import StopAutomaton, StopMatcher
from engine.structured_output.params import StructuredOutputsParams

# Bounds shared with the OpenAI API.
MAX_LOGPROBS = 20
PENALTY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
# Seeds are 64-bit integers (OpenAI's `seed` is int64); torch accepts [-2**63, 2**64 - 1], so
# seed + i for each of n choices stays in range.
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)
# Neutral values of the fields a model's generation_config may set; None in a constructor
# argument means "unset" and becomes this value until `with_defaults` supplies another.
MODEL_DEFAULTABLE: dict[str, float | int] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def _fail(name: str, message: str) -> InvalidParameterError:
    return InvalidParameterError(name, message)


def _check_int(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # bool is a subclass of int; `max_tokens=True` is a client bug, not the number 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(name, f"{name} must be an integer, got {type(value).__name__} {show(value)}")


def _check_float(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _fail(name, f"{name} must be a number, got {type(value).__name__} {show(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float range
        raise _fail(name, f"{name} must be a finite number, got {show(value)}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise _fail(name, f"{name} must be a finite number, got {value!r}")
    return value


@dataclass(frozen=True)
class RequestLimits:
    """What `SamplingParams.verify` checks a request against: the model's vocabulary and the
    engine's bounds on stop strings (OpenAI allows 4 stop strings; ours are configurable).
    Stop strings are matched incrementally, so per-token work does not grow with them, but
    their automaton and the held-back text do: hence a bound on their total size."""

    vocab_size: int
    max_stop_strings: int = 16
    max_stop_chars: int = 4096


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request, and when to stop.

    Guarantees after construction: `stop` and `stop_token_ids` are lists (possibly empty),
    `top_k` is 0 when off (-1 is accepted as "off" and normalized), float fields are floats,
    no field is None except `max_tokens`, `seed` and `logprobs`, and every field is within the
    ranges documented in `__post_init__`.
    """

    n: int = 1
    max_tokens: int | None = 16  # None: up to the context limit (the engine resolves it)
    temperature: float | None = None  # 0 = greedy; None: the model's default, else 1.0
    top_k: int | None = None  # 0 or -1 = off; None: the model's default, else off
    top_p: float | None = None  # None: the model's default, else 1.0
    min_p: float | None = None  # None: the model's default, else 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None  # None: the model's default, else 1.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top-n per generated token; 0 = only the chosen token
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # when set, only these tokens can be sampled
    # output constrained to a JSON schema / regex / choice / grammar (engine/structured_output/)
    structured_outputs: StructuredOutputsParams | None = None
    # Names of MODEL_DEFAULTABLE fields the caller left unset (None); computed at construction.
    # It is an init field so that `SamplingParams(**vars(p))` and `dataclasses.replace` keep it.
    unset: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    # The automaton of `stop`, built on the first `stop_matcher()` call and shared by the n
    # sequences of the request (and by clones); rebuilt if `stop` changes.
    stop_automaton: StopAutomaton | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.unset, (set, frozenset)) or not set(self.unset) <= MODEL_DEFAULTABLE.keys():
            raise _fail("unset", f"unset must be a set of {sorted(MODEL_DEFAULTABLE)}")
        unset = frozenset(self.unset) | {k for k in MODEL_DEFAULTABLE if getattr(self, k) is None}
        for name in unset:
            if getattr(self, name) is None:
                setattr(self, name, MODEL_DEFAULTABLE[name])
        self.unset = frozenset(unset)

        _check_int("n", self.n)
        if self.n < 1:
            raise _fail("n", f"n must be >= 1, got {self.n}")
        _check_int("max_tokens", self.max_tokens, allow_none=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise _fail("max_tokens", f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        self._check_model_defaultable()
        _check_int("seed", self.seed, allow_none=True)
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise _fail("seed", f"seed must be a 64-bit integer in [-2**63, 2**63 - 1], got {show(self.seed)}")

        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not lo <= value <= hi:
                raise _fail(name, f"{name} must be in [{lo}, {hi}], got {value}")
            setattr(self, name, value)

        self.stop = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_stop_token_ids(self.stop_token_ids)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, f"{name} must be a boolean, got {show(getattr(self, name))}")

        _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise _fail("min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _fail("min_tokens",
                        f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        self.logit_bias = self._normalize_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = self._normalize_ids("allowed_token_ids", self.allowed_token_ids)
            if not self.allowed_token_ids:
                raise _fail("allowed_token_ids", "allowed_token_ids must not be empty")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _fail("structured_outputs", "structured_outputs must be a StructuredOutputsParams, got "
                                              f"{type(self.structured_outputs).__name__}")
        _check_int("logprobs", self.logprobs, allow_none=True)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise _fail("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}], got {show(self.logprobs)}")

    def _check_model_defaultable(self) -> None:
        """Ranges of temperature, top_p, top_k, min_p, repetition_penalty (also used to check
        a model's defaults before they are applied)."""
        self.temperature = _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise _fail("temperature", f"temperature must be >= 0, got {self.temperature}")
        self.top_p = _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise _fail("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise _fail("top_k", f"top_k must be -1 (off), 0 (off) or positive, got {show(self.top_k)}")
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise _fail("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise _fail("repetition_penalty", f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @staticmethod
    def _normalize_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)):
            raise _fail("stop", f"stop must be a string or a list of strings, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str):
                raise _fail("stop", f"stop must hold only strings, got {type(s).__name__} {show(s)}")
            if not s:
                raise _fail("stop", "stop strings must be non-empty")
        return list(stop)

    @staticmethod
    def _normalize_stop_token_ids(ids: object) -> list[int]:
        return [] if ids is None else SamplingParams._normalize_ids("stop_token_ids", ids)

    @staticmethod
    def _normalize_ids(name: str, ids: object) -> list[int]:
        if not isinstance(ids, (list, tuple)):
            raise _fail(name, f"{name} must be a list of integers, got {type(ids).__name__}")
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise _fail(name, f"{name} must hold non-negative integers, got {show(i)}")
        return list(ids)

    @staticmethod
    def _normalize_logit_bias(bias: object) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise _fail("logit_bias", f"logit_bias must map token ids to numbers, got {type(bias).__name__}")
        lo, hi = LOGIT_BIAS_RANGE
        out = {}
        for token, value in bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise _fail("logit_bias", f"logit_bias keys must be non-negative token ids, got {show(token)}")
            value = _check_float("logit_bias", value)
            if not lo <= value <= hi:
                raise _fail("logit_bias", f"logit_bias values must be in [{lo}, {hi}], got {value}")
            out[token] = value
        return out or None

    def verify(self, limits: RequestLimits) -> None:
        """Checks what depends on the model and the engine: every token id is below the
        vocabulary size, and the stop strings are within the engine's bounds. Raises
        InvalidParameterError naming the field."""
        vocab = limits.vocab_size
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias or ()),
                          ("allowed_token_ids", self.allowed_token_ids or ())):
            bad = next((i for i in ids if i >= vocab), None)
            if bad is not None:
                raise _fail(name, f"{name} must hold token ids in [0, {vocab}) for this model, got {show(bad)}")
        if len(self.stop) > limits.max_stop_strings:
            raise _fail("stop", f"stop may hold at most {limits.max_stop_strings} strings, got {len(self.stop)}")
        total = sum(len(s) for s in self.stop)
        if total > limits.max_stop_chars:
            raise _fail("stop", f"stop strings may total at most {limits.max_stop_chars} characters, "
                                f"got {total}")

    def with_defaults(self, defaults: Mapping[str, float | int]) -> "SamplingParams":
        """A copy in which the fields the caller left unset take `defaults` (the model's
        recommended values; keys outside MODEL_DEFAULTABLE are ignored). Fields the caller set
        always win. Raises InvalidParameterError if a default is out of range."""
        chosen = {k: v for k, v in defaults.items() if k in self.unset}
        if not chosen:
            return self
        out = self.clone()
        for name, value in chosen.items():
            setattr(out, name, value)
        out._check_model_defaultable()
        return out

    @property
    def is_greedy(self) -> bool:
        """True when the next token is always the argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def max_stop_str_len(self) -> int:
        """Length of the longest stop string (0 when there is none)."""
        return max((len(s) for s in self.stop), default=0)

    def stop_matcher(self) -> StopMatcher | None:
        """A fresh matcher over the stop strings (None when there are none)."""
        if not self.stop:
            return None
        if self.stop_automaton is None or self.stop_automaton.stops != tuple(self.stop):
            self.stop_automaton = StopAutomaton(self.stop)
        return StopMatcher(self.stop_automaton)

    def clone(self) -> "SamplingParams":
        """An independent copy: changing its lists leaves this one untouched. The stop
        automaton, never modified once built, is shared rather than copied."""
        memo = {} if self.stop_automaton is None else {id(self.stop_automaton): self.stop_automaton}
        return copy.deepcopy(self, memo)
