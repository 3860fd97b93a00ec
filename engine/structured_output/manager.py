"""`StructuredOutputManager`: the engine's one handle on structured outputs.

`attach` gives each sequence of a constrained request its own `GrammarState` over the shared
compilation (`n > 1`: one matcher per child), `submit` starts (or finds cached) a compilation
without waiting, and `take_failed` hands the engine the sequences whose compilation has failed
since, so it can end them with an error. The xgrammar compiler (and its vocabulary table) is
created on first use only: engines that never see a constrained request never load xgrammar.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from engine.structured_output.compiler import GrammarCompiler
from engine.structured_output.grammar_state import GrammarState
from engine.structured_output.params import StructuredOutputsParams

if TYPE_CHECKING:
    from engine.request import Request


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        self._args = (tokenizer, vocab_size, list(stop_token_ids))
        self._compiler: GrammarCompiler | None = None
        self._pending: list[Request] = []  # sequences whose grammar was compiling when added

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            if self._args[0] is None:
                raise ValueError("structured_outputs needs a tokenizer: this engine was started without one")
            self._compiler = GrammarCompiler(*self._args)
        return self._compiler

    def submit(self, spec: StructuredOutputsParams) -> Future:
        """The compilation of `spec` (started now, or cached); never blocks. Callers that can
        wait off the engine thread (the server) await it to answer a bad constraint with 400
        before the request is queued."""
        return self.compiler.submit(spec)

    def attach(self, spec: StructuredOutputsParams | None, sequences: list[Request]) -> None:
        """Gives every sequence a grammar state. Raises InvalidParameterError at once when the
        constraint is already known not to compile."""
        if spec is None:
            return
        future = self.submit(spec)
        if future.done() and future.exception() is not None:
            raise future.exception()
        for seq in sequences:
            seq.grammar = GrammarState(future)
        if not future.done():
            self._pending.extend(sequences)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def take_failed(self) -> list[tuple[Request, str]]:
        """Sequences (still unfinished) whose grammar failed to compile, with the reason; each is
        handed out once."""
        failed, still = [], []
        for seq in self._pending:
            if seq.status.finished:
                continue
            if not seq.grammar.is_ready():
                still.append(seq)
            elif seq.grammar.error is not None:
                failed.append((seq, str(seq.grammar.error)))
        self._pending = still
        return failed
