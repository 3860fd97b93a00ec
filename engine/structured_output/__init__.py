"""Structured outputs: constrain a request's tokens to a JSON schema, a regex, a fixed choice
or an EBNF grammar (xgrammar builds the automaton and the token masks).

The pieces, one per file:

* `params.StructuredOutputsParams` -- what the caller asks for (one of json / regex / choice /
  grammar / json_object), checked cheaply at construction (`InvalidParameterError` naming the
  field: a malformed JSON schema, a regex Python cannot compile, an empty choice list).
* `compiler.GrammarCompiler` -- compiles on one worker thread, never on the step loop; results
  cached by the spec's hash; `submit(spec)` returns a `concurrent.futures.Future`.
* `grammar_state.GrammarState` -- one per sequence (each of `n > 1` children has its own): a
  matcher kept in step with the sequence's output tokens (replays or rolls back as needed, so
  preemption and recompute cannot desynchronize it).
* `bitmask.apply_grammar_masks` -- one batched bitmask applied to the constrained rows only.

Other helpers reuse this by building a `StructuredOutputsParams` and putting it on
`SamplingParams.structured_outputs`; the engine does the rest.
"""
from engine.structured_output.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
