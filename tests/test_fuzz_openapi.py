"""Schema-driven fuzzing: schemathesis (pinned in setup.py's test extra) reads the server's own
`/openapi.json` and sends every operation requests generated from it, in-process over ASGI,
to the app serving a tiny random Llama (2 layers, 64-token context: the real engine and its
checks, at almost no model compute, so the budget goes to requests).

For each operation it sends schema-valid requests and schema-invalid ones, and asserts:
- no 5xx, ever;
- every response conforms to the document: a declared status code, the declared content
  type, declared headers, a body matching the declared schema;
- schema-invalid requests are refused with a 4xx.
Schema-valid requests the server still refuses (the document allows more than the server
takes) are printed with the field and message, to be fixed in the document.

Deterministic and bounded: Hypothesis derandomized (a fixed seed), a fixed number of examples
per operation and mode (a few hundred cases, well under 60 s on a busy 2-core machine).
"""
from __future__ import annotations

import collections
import re
import time
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, negative_data_rejection, positive_data_acceptance,
    response_headers_conformance, response_schema_conformance, status_code_conformance)

CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance,
               response_headers_conformance, response_schema_conformance]
EXAMPLES = {"POST": 20, "GET": 5}  # per operation and mode; GETs here take no parameters


@dataclass
class FuzzReport:
    cases: int = 0
    seconds: float = 0.0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    # (operation, mode, failure title) -> (count, first message)
    failures: dict[tuple[str, str, str], list] = field(default_factory=dict)
    # schema-valid requests answered 4xx: (operation, status, param, message shape) -> count
    refusals: collections.Counter = field(default_factory=collections.Counter)

    def refused(self, operation: str, response) -> None:
        try:
            error = response.json()["error"]
        except Exception:  # noqa: BLE001 - not an envelope: reported as such
            error = {"param": None, "message": response.text[:120]}
        shape = re.sub(r"\d+", "N", re.sub(r"'[^']*'|`[^`]*`", "'...'", str(error.get("message"))))[:160]
        self.refusals[(operation, response.status_code, error.get("param"), shape)] += 1

    def add(self, operation: str, mode: str, exc: BaseException, body: object = None) -> None:
        for sub in getattr(exc, "exceptions", [exc]):
            key = (operation, mode, getattr(sub, "title", type(sub).__name__))
            entry = self.failures.setdefault(key, [0, f"{str(sub)[:2000]}\nbody: {str(body)[:1000]}"])
            entry[0] += 1

    def where(self, titles: set[str], exclude: bool = False) -> dict:
        return {k: v for k, v in self.failures.items() if (k[2] in titles) != exclude}

    def describe(self, failures: dict) -> str:
        return "\n\n".join(f"{n} x {op} [{mode}] {title}:\n{msg}" for (op, mode, title), (n, msg)
                           in sorted(failures.items()))

    def describe_refusals(self) -> str:
        return "\n".join(f"{n:3d} x {op} -> {status} param={param}: {shape}"
                         for (op, status, param, shape), n in sorted(self.refusals.items()))


VALID_REJECTED = {"Schema-valid request rejected"}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> FuzzReport:
    from engine.async_engine import AsyncEngine
    from server.app import build_app
    from tests.test_server_harness import tiny_config

    # the real engine (so its own checks run) on a tiny model with a short context, so that no
    # generated request runs long
    engine = AsyncEngine.from_config(tiny_config(str(tmp_path_factory.mktemp("tiny")), max_model_len=64,
                                                 num_threads=1))
    app = build_app(engine)
    assert engine.wait_ready(120)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    rep = FuzzReport()
    start = time.monotonic()
    try:
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                checks = CONFORMANCE + [positive_data_acceptance if mode is GenerationMode.POSITIVE
                                        else negative_data_rejection]
                _fuzz_operation(op, mode, checks, EXAMPLES.get(op.method.upper(), 10), rep)
    finally:
        engine.shutdown()
    rep.seconds = time.monotonic() - start
    return rep


def _fuzz_operation(op, mode, checks, examples: int, rep: FuzzReport) -> None:
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    def run(case) -> None:
        rep.cases += 1
        try:
            response = case.call(timeout=30)
            rep.statuses[response.status_code] += 1
            if mode is GenerationMode.POSITIVE and 400 <= response.status_code < 500:
                rep.refused(op.label, response)
            case.validate_response(response, checks=checks)
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collected, asserted below
            rep.add(op.label, mode.value, exc, getattr(case, "body", None))

    try:
        run()
    except Unsatisfiable:
        pass  # nothing to make invalid (an operation without parameters or body)


def test_fuzz_no_5xx_and_every_response_conforms(report: FuzzReport):
    assert report.cases >= 150, report.cases
    assert not any(status >= 500 for status in report.statuses), report.statuses
    broken = report.where(VALID_REJECTED, exclude=True)
    print(f"\nfuzz: {report.cases} cases in {report.seconds:.0f} s, statuses {dict(sorted(report.statuses.items()))}")
    print("schema-valid requests refused:\n" + report.describe_refusals())
    assert not broken, report.describe(broken)


# Refusals of schema-valid requests that no schema can prevent: they depend on the model
# (vocabulary, context length) or relate two fields.
SEMANTIC = ("below the vocabulary size", "for this model", "prompt token ids must be in",
            "maximum context length", "must be <= max_tokens", "requires logprobs",
            # structured outputs / tools: the validity of a schema, regex or grammar the document
            # carries as a string or object, and pairs of fields (server/structured_request.py)
            "is not a valid JSON schema", "is not a valid regular expression", "could not be compiled",
            "give only one of", "cannot be combined", "not in tools", "needs tools",
            # 408: the request's own `timeout` field, shorter than its generation took (on a
            # loaded machine a generated timeout of a few seconds can run out)
            "did not finish within its timeout")


def test_schema_valid_requests_are_accepted(report: FuzzReport):
    """The document says what the server takes: a schema-valid request is refused only for
    a reason that depends on the model or on two fields together (and 404 for an unknown
    model name)."""
    unexplained = {k: n for k, n in report.refusals.items()
                   if k[1] != 404 and not any(s in k[3] for s in SEMANTIC)}
    assert not unexplained, "\n".join(f"{n} x {k}" for k, n in sorted(unexplained.items()))
