"""Structured output: a request's grammar constrains every token it samples (llguidance).

Why llguidance: it compiles JSON schemas, regexes and Lark grammars lazily (no ahead-of-time work per
schema, so a new schema costs nothing up front), computes a token mask in tens of microseconds on the
CPU, and is a single dependency-free wheel; xgrammar, the other library of the field, pulls Triton
(1 GB) into every install. Masks are computed on the host for the constrained rows only, copied to the
device once per step, and applied before any other sampling step, so greedy and sampled rows,
penalties and logit bias all see only allowed tokens.

A grammar is described by `Grammar(kind, source)` (plain strings: it travels to the engine process
with the sampling parameters); each running request gets its own matcher, created at its first
sampled token and advanced with every token it takes. When the grammar is complete the matcher
allows only EOS; a matcher that stops (its language admits nothing longer) finishes the request.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
# JSON is generated compact, with the separators ", " and ": " (llguidance's fixed whitespace): with any
# whitespace allowed, a small or unsure model can pad the object until max_tokens cuts it.
JSON_DEFAULTS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """The grammar does not compile (message names the problem)."""


@dataclass(frozen=True)
class Grammar:
    """What constrains a request: `kind` one of KINDS; `source` the schema (JSON text), the regex, the
    choices (a JSON list of strings) or the Lark grammar."""

    kind: str
    source: str

    def llguidance_grammar(self) -> str:
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_DEFAULTS)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=JSON_DEFAULTS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            choices = json.loads(self.source)
            return LLMatcher.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in choices))
        if self.kind == "lark":
            return LLMatcher.grammar_from_lark(self.source)
        raise GrammarError(f"unknown grammar kind {self.kind!r}")

    def validate(self) -> None:
        """Raise GrammarError with the compiler's message unless the grammar compiles (remembered per
        grammar: the API, then each of a request's n choices, ask again)."""
        error = _compile_error(self)
        if error:
            raise GrammarError(error)


@functools.lru_cache(maxsize=256)
def _compile_error(grammar: Grammar) -> str:
    """The first line of llguidance's error for `grammar`, or "" when it compiles."""
    from llguidance import LLMatcher

    try:
        error = LLMatcher.validate_grammar(grammar.llguidance_grammar())
    except (ValueError, TypeError, RuntimeError) as err:
        return str(err) or type(err).__name__
    return error.strip().splitlines()[0] if error else ""


class GrammarBackend:
    """The tokenizer llguidance needs (built once: ~1 s) and the per-request matchers of one engine."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Collection[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)

    @functools.cached_property
    def _ll_tokenizer(self):
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                            eos_token=self.eos_token_ids or None)

    def matcher(self, grammar: Grammar, output_ids: Sequence[int] = ()):
        """A fresh matcher for `grammar`, advanced over tokens already generated (a resumed request)."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self._ll_tokenizer, grammar.llguidance_grammar())
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        for token in output_ids:
            matcher.consume_token(token)
        return matcher

    def allowed_mask(self, matchers: list) -> torch.Tensor:
        """[len(matchers), vocab] bool on the CPU: True where the matcher allows the token."""
        import llguidance.torch as llt

        words = llt.allocate_token_bitmask(len(matchers), self._ll_tokenizer.vocab_size)
        for row, matcher in enumerate(matchers):
            llt.fill_next_token_bitmask(matcher, words, row)
        bits = (words[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.view(len(matchers), -1)[:, : self.vocab_size].bool()
