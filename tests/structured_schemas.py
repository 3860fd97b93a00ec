"""Seeded random JSON schemas for the structured-output tests: objects (required subsets,
additionalProperties false), arrays with bounded length, enums, bounded integers and numbers,
short strings, booleans, nested up to depth 2 -- small enough that a constrained random model
usually finishes them within a few dozen tokens."""
from __future__ import annotations

import random
from typing import Any


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(6)
    if kind == 0:
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 100)}
    if kind == 1:
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000])}
    if kind == 2:
        return {"enum": rng.sample(["red", "green", "blue", "cyan", 1, 2, None, True], rng.randint(1, 4))}
    if kind == 3:
        return {"type": "string", "maxLength": rng.randint(1, 6)}
    if kind == 4:
        return {"type": "boolean"}
    return {"type": "string", "enum": ["a", "b b", "c\"d"]}


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    kind = rng.randrange(3) if depth < 2 else 2
    if kind == 0 or depth == 0:
        names = rng.sample(["id", "name", "size", "ok", "tags", "pos", "kind"], rng.randint(1, 3))
        props = {n: random_schema(rng, depth + 1) if rng.random() < 0.3 else _leaf(rng) for n in names}
        return {"type": "object", "properties": props,
                "required": [n for n in names if rng.random() < 0.7], "additionalProperties": False}
    if kind == 1:
        return {"type": "array", "items": _leaf(rng), "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
    return _leaf(rng)


def random_schemas(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [random_schema(rng) for _ in range(n)]
