"""A small PromQL evaluator over a series of Prometheus text scrapes, enough for the
expressions of deploy/grafana/conveyor-dashboard.json, so its panels can be drawn offline
(benchmarks/dashboard_png.py) without a Prometheus server.

Supported: selectors with `=`, `!=`, `=~`, `!~` matchers and a range (`[15s]`), `rate` and
`increase` (last minus first sample in the window, counter resets ignored, no extrapolation:
a slight under-estimate at window edges compared with Prometheus), `sum`/`max`/`min`/`avg` with
`by (...)`, `histogram_quantile` (linear interpolation inside the bucket, as Prometheus does),
numbers, parentheses and `+ - * /` between vectors (matched on identical labels) and scalars.
Anything else raises ValueError naming it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset  # of (name, value) pairs
Vector = dict  # Labels -> float
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:e[+-]?\d+)?)|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
                    r"|(?P<str>\"(?:[^\"\\]|\\.)*\")|(?P<range>\[[0-9]+[smh]\])|(?P<op>=~|!~|!=|[-+*/(){},=]))")
_AGGREGATIONS = {"sum": sum, "max": max, "min": min, "avg": lambda v: sum(v) / len(v)}


@dataclass
class Scrapes:
    """Samples by time: `times[i]` (seconds) and `samples[i]`, {(name, Labels): value}."""

    times: list
    samples: list

    def add(self, t: float, text: str) -> None:
        row = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                row[(s.name, frozenset(s.labels.items()))] = s.value
        self.times.append(t)
        self.samples.append(row)


def _seconds(r: str) -> float:
    return float(r[1:-2]) * {"s": 1, "m": 60, "h": 3600}[r[-2]]


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens, pos = [], 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise ValueError(f"cannot parse {text[pos:]!r}")
            kind = m.lastgroup
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None)

    def take(self, value=None):
        tok = self.peek()
        if value is not None and tok[1] != value:
            raise ValueError(f"expected {value!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def expr(self):
        node = self.term()
        while self.peek()[1] in ("+", "-"):
            node = ("bin", self.take()[1], node, self.term())
        return node

    def term(self):
        node = self.atom()
        while self.peek()[1] in ("*", "/"):
            node = ("bin", self.take()[1], node, self.atom())
        return node

    def atom(self):
        kind, value = self.take()
        if kind == "num":
            return ("num", float(value))
        if value == "(":
            node = self.expr()
            self.take(")")
            return node
        if kind != "name":
            raise ValueError(f"unexpected {value!r}")
        if value in _AGGREGATIONS:
            by = ()
            if self.peek()[1] == "by":
                self.take()
                by = self.labels()
            self.take("(")
            inner = self.expr()
            self.take(")")
            return ("agg", value, by, inner)
        if value in ("rate", "increase"):
            self.take("(")
            sel = self.selector(self.take()[1])
            self.take(")")
            return (value, sel)
        if value == "histogram_quantile":
            self.take("(")
            q = float(self.take()[1])
            self.take(",")
            inner = self.expr()
            self.take(")")
            return ("hq", q, inner)
        return self.selector(value)

    def labels(self):
        self.take("(")
        names = []
        while self.peek()[1] != ")":
            names.append(self.take()[1])
            if self.peek()[1] == ",":
                self.take()
        self.take(")")
        return tuple(names)

    def selector(self, name):
        matchers = []
        if self.peek()[1] == "{":
            self.take()
            while self.peek()[1] != "}":
                label, op, value = self.take()[1], self.take()[1], self.take()[1]
                matchers.append((label, op, value[1:-1].encode().decode("unicode_escape")))
                if self.peek()[1] == ",":
                    self.take()
            self.take("}")
        window = _seconds(self.take()[1]) if self.peek()[0] == "range" else None
        return ("sel", name, tuple(matchers), window)


def _matches(labels: Labels, matchers) -> bool:
    d = dict(labels)
    for label, op, value in matchers:
        have = d.get(label, "")
        ok = {"=": have == value, "!=": have != value,
              "=~": re.fullmatch(value, have) is not None, "!~": re.fullmatch(value, have) is None}[op]
        if not ok:
            return False
    return True


def evaluate(expr: str, scrapes: Scrapes, i: int, variables: dict[str, str] | None = None):
    """The value of `expr` at scrape `i`: a Vector, or a float for a scalar expression."""
    for k, v in (variables or {}).items():
        expr = expr.replace(f"${k}", v)
    return _eval(_Parser(expr).expr(), scrapes, i)


def _eval(node, sc: Scrapes, i: int):
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "sel":
        _, name, matchers, _ = node
        return {lab: v for (n, lab), v in sc.samples[i].items() if n == name and _matches(lab, matchers)}
    if kind in ("rate", "increase"):
        _, name, matchers, window = node[1]
        start = next(j for j in range(i + 1) if sc.times[i] - sc.times[j] <= window)
        if start == i:
            return {}
        now = _eval(("sel", name, matchers, None), sc, i)
        then = _eval(("sel", name, matchers, None), sc, start)
        dt = sc.times[i] - sc.times[start]
        return {lab: (v - then[lab]) / (dt if kind == "rate" else 1.0) for lab, v in now.items() if lab in then}
    if kind == "agg":
        _, fn, by, inner = node
        groups: dict = {}
        for lab, v in _eval(inner, sc, i).items():
            key = frozenset((k, val) for k, val in lab if k in by)
            groups.setdefault(key, []).append(v)
        return {k: _AGGREGATIONS[fn](vs) for k, vs in groups.items()}
    if kind == "hq":
        _, q, inner = node
        by_group: dict = {}
        for lab, v in _eval(inner, sc, i).items():
            d = dict(lab)
            le = float(d.pop("le"))
            by_group.setdefault(frozenset(d.items()), []).append((le, v))
        return {k: _quantile(q, sorted(b)) for k, b in by_group.items() if _quantile(q, sorted(b)) is not None}
    if kind == "bin":
        _, op, left, right = node
        a, b = _eval(left, sc, i), _eval(right, sc, i)
        f = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y,
             "/": lambda x, y: x / y if y else math.nan}[op]
        if isinstance(a, float) and isinstance(b, float):
            return f(a, b)
        if isinstance(a, float):
            return {lab: f(a, v) for lab, v in b.items()}
        if isinstance(b, float):
            return {lab: f(v, b) for lab, v in a.items()}
        return {lab: f(v, b[lab]) for lab, v in a.items() if lab in b}
    raise ValueError(f"unsupported {kind}")


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile on cumulative (le, count) buckets."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le
