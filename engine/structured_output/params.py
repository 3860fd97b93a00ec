"""`StructuredOutputsParams`: the constraint a request puts on its output.

Exactly one of `json` (a JSON schema, as a dict or a JSON string), `regex`, `choice` (a list
of strings; the output is exactly one of them), `grammar` (EBNF, xgrammar / GBNF dialect) or
`json_object=True` (any JSON object) is set. Construction checks what is cheap to check
(the schema against its JSON Schema metaschema, the regex with Python's `re`, the choice list);
anything the grammar engine still refuses surfaces when it compiles (`GrammarCompiler`), also
as `InvalidParameterError`. `param` is the field name reported in errors; the server sets it
to the name the client used (e.g. `response_format.json_schema.schema`, `guided_regex`).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidParameterError, show

KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_SPEC_CHARS = 100_000  # a bigger schema or grammar is refused rather than compiled


@dataclass
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    param: str = ""  # the field name errors report; "" -> "structured_outputs.<kind>"

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidParameterError(
                self.param or "structured_outputs",
                f"{self.param or 'structured_outputs'} must set exactly one of {', '.join(KINDS)}, "
                f"got {given or 'none'}")
        self.kind = given[0]
        if not self.param:
            self.param = f"structured_outputs.{self.kind}"
        getattr(self, f"_check_{self.kind}")()
        if len(self.source) > MAX_SPEC_CHARS:
            self._fail(f"is too large ({len(self.source)} characters, at most {MAX_SPEC_CHARS})")

    def _fail(self, message: str) -> InvalidParameterError:
        raise InvalidParameterError(self.param, f"{self.param} {message}")

    def _check_json(self) -> None:
        schema = self.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                self._fail(f"must be a JSON schema; the string is not JSON: {exc}")
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            self._fail(f"must be a JSON schema object, got {type(schema).__name__}")
        import jsonschema  # noqa: PLC0415 - only requests with a schema pay for the import

        try:
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
        except jsonschema.SchemaError as exc:
            self._fail(f"is not a valid JSON schema: {exc.message[:200]}")
        self.json = schema

    def _check_regex(self) -> None:
        if not isinstance(self.regex, str) or not self.regex:
            self._fail(f"must be a non-empty string, got {show(self.regex)}")
        try:
            re.compile(self.regex)
        except re.error as exc:
            self._fail(f"is not a valid regular expression: {exc}")

    def _check_choice(self) -> None:
        c = self.choice
        if not isinstance(c, (list, tuple)) or not c or not all(isinstance(s, str) and s for s in c):
            self._fail("must be a non-empty list of non-empty strings")
        self.choice = list(c)

    def _check_grammar(self) -> None:
        if not isinstance(self.grammar, str) or not self.grammar.strip():
            self._fail(f"must be a non-empty EBNF grammar string, got {show(self.grammar)}")

    def _check_json_object(self) -> None:
        if self.json_object is not True:
            self._fail("must be true")

    @property
    def source(self) -> str:
        """The constraint as one canonical string (what the cache key hashes)."""
        if self.kind == "json":
            return json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        if self.kind == "choice":
            return json.dumps(self.choice)
        if self.kind == "json_object":
            return "{}"
        return getattr(self, self.kind)

    @property
    def key(self) -> str:
        """Cache key: equal for constraints that compile to the same grammar."""
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode("utf-8", "surrogatepass")).hexdigest()
