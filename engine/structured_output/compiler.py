"""`GrammarCompiler`: turns `StructuredOutputsParams` into xgrammar `CompiledGrammar`s on one
worker thread, so a compilation never runs on (and never stalls) the engine's step loop.

Guarantees: `submit` never blocks (it returns a `Future`); the same constraint (by
`StructuredOutputsParams.key`) is compiled once and then served from a bounded LRU cache, failures
included (a bad schema fails again at once); a constraint xgrammar refuses completes its future
with `InvalidParameterError` naming the field. The tokenizer's vocabulary table (about a second
for a 49k vocabulary) is also built on the worker, at construction, so engine start-up does not
wait for it.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from engine.errors import InvalidParameterError
from engine.structured_output.params import StructuredOutputsParams
from engine.structured_output.schema_fixes import fix_schema

CACHE_SIZE = 512


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], cache_size: int = CACHE_SIZE):
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conveyor-grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._cache_size = cache_size
        self._compiler = self._pool.submit(self._make_compiler, tokenizer, vocab_size, sorted(stop_token_ids))

    @staticmethod
    def _make_compiler(tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> Any:
        import xgrammar as xgr  # noqa: PLC0415 - engines without structured requests never load it

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        return xgr.GrammarCompiler(info, max_threads=1)

    def submit(self, spec: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar (cached by `spec.key`); never blocks."""
        key = spec.key
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return future

    def is_cached(self, spec: StructuredOutputsParams) -> bool:
        with self._lock:
            return spec.key in self._cache

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        compiler = self._compiler.result()
        try:
            if spec.kind == "json":
                return compiler.compile_json_schema(json.dumps(fix_schema(spec.json)), any_whitespace=False)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.regex)
            if spec.kind == "choice":
                alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
                return compiler.compile_grammar(f"root ::= {alternatives}")
            return compiler.compile_grammar(spec.grammar)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError on bad input
            message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise InvalidParameterError(spec.param, f"{spec.param} could not be compiled: {message}") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
