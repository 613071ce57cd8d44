"""Incremental detokenization, O(1) per token, with stop strings that are never emitted, even in part.

Each step decodes only a short window of the newest tokens, as vLLM does with its prefix and read
offsets: the window starts at the tokens of the previous released piece, so a decoder that looks at
its neighbour (SentencePiece's leading-space strip, byte-level BPE's multi-byte characters) sees the
same context as a full decode does. `tokenizers`' DecodeStream runs the same scheme in Rust but cannot
flush: a trailing partial character at the end of a stream never comes out, so its text can fall
short of a full decode. Here `step(..., is_last=True)` releases it, and the concatenated output equals
`tokenizer.decode(output_ids, skip_special_tokens=True)` (cut before the first stop string).

As in vLLM, a stop or EOS token that ends a request leaves no text (`step(..., drop_last=True)`), and
`include_stop`, vLLM's `include_stop_str_in_output`, keeps both that token's text and a stop string found,
cutting the text right after the stop string instead of before it. As in vLLM too, stop strings are
looked for only once the output is longer than `min_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tokenizers import decoders

from server.engine.request import FinishReason, Request, SamplingParams

REPLACEMENT_CHAR = "\ufffd"  # what a decoder yields for the bytes of a character not complete yet


class TokenDecoder:
    """How one tokenizer's ids become text, for incremental detokenization; built once per tokenizer."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # Whether a window's text is the text of its first part followed by that of its second, wherever
        # the first part's bytes end on a whole character: true of a byte-level decoder alone (its tokens'
        # bytes concatenated, then decoded as UTF-8), not of SentencePiece's (it strips the window's first
        # space) nor of a wrapper's clean-up.
        self.is_additive = False
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            # The Rust decoder directly: what tokenizer.decode calls, minus the wrapper's overhead.
            self.decode: Callable[[list[int]], str] = lambda ids: backend.decode(ids, skip_special_tokens=True)
            self.is_additive = isinstance(backend.decoder, decoders.ByteLevel)
        else:
            self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        # A ByteFallback decoder (SentencePiece-style <0xNN> tokens) turns a run of byte tokens into
        # text as a whole, every byte a U+FFFD if any is invalid: a run's text is final only once a
        # token of another kind follows it.
        self.byte_token_ids: frozenset[int] = frozenset()
        if backend is not None and "ByteFallback" in repr(backend.decoder):
            ids = (backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
            self.byte_token_ids = frozenset(i for i in ids if i is not None)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into released text: a few tokens are decoded per step."""

    def __init__(self, decoder: TokenDecoder, stop: Sequence[str] = (), include_stop: bool = False,
                 min_tokens: int = 0):
        self._decode = decoder.decode
        self._is_additive = decoder.is_additive
        self._byte_token_ids = decoder.byte_token_ids
        self._stop = [s for s in stop if s]
        self._include_stop = include_stop
        self._min_tokens = min_tokens  # no stop string ends the output before it has more tokens than this
        # include_stop: nothing is held back (the stop string is released with the text before it), so a stop
        # string that starts in text already released is searched for in its last characters (`_tail`).
        self._lookback = max((len(s) for s in self._stop), default=1) - 1 if include_stop else 0
        self._tail = ""
        self._prefix_offset = 0  # first token of the decode window
        self._read_offset = 0  # tokens whose text has been decoded (released or held)
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset]), alone
        self._released: list[str] = []
        self._held = ""  # decoded text that ends like the start of a stop string
        self.is_stopped = False  # a stop string was found; nothing more is released

    @classmethod
    def for_params(cls, decoder: TokenDecoder, params: SamplingParams) -> IncrementalDetokenizer:
        """The detokenizer of a request with these sampling parameters (its stop strings and their rules)."""
        return cls(decoder, params.stop, params.include_stop_str_in_output, params.min_tokens)

    @property
    def text(self) -> str:
        """Everything decoded so far: the released text and the held-back tail."""
        return "".join(self._released) + self._held

    def step(self, token_ids: list[int], is_last: bool = False, drop_last: bool = False) -> str:
        """Decode the tokens appended to `token_ids` since the last call; return the text to release.

        `token_ids` is the whole output so far (only its tail is read). `is_last`: no token follows,
        so a trailing partial character and any held-back tail are released too. `drop_last` (with
        `is_last`): the last token is the stop or EOS token that ended the request, whose text is not
        released unless `include_stop`.
        """
        if self.is_stopped:
            return ""
        if drop_last and not self._include_stop:
            token_ids = token_ids[:-1]
        searching = len(token_ids) > self._min_tokens
        if self._include_stop:
            return self._step_including(self._decode_new(token_ids, is_last), searching)
        candidate = self._held + self._decode_new(token_ids, is_last)
        if not candidate:
            return ""
        stop_at = self._find_stop(candidate) if searching else -1
        if stop_at >= 0:
            self.is_stopped = True
            self._held = ""
            return self._release(candidate[:stop_at])
        keep = 0 if is_last else self._stop_prefix_length(candidate)
        self._held = candidate[len(candidate) - keep:] if keep else ""
        return self._release(candidate[: len(candidate) - keep])

    def _decode_new(self, token_ids: list[int], is_last: bool) -> str:
        if len(token_ids) == self._read_offset or (not is_last and token_ids[-1] in self._byte_token_ids):
            return ""
        text = self._decode(token_ids[self._prefix_offset:])
        if not is_last and (len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing visible yet, or a character whose bytes are still arriving
        new_text = text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(token_ids)
        # The next window's first part alone. Additive decoders: it is `new_text`, because the tokens before
        # it ended on a whole character (the text did not end in U+FFFD): one decode a step instead of two.
        self._prefix_text = (new_text if self._is_additive
                             else self._decode(token_ids[self._prefix_offset:self._read_offset]))
        return new_text

    def _step_including(self, new_text: str, searching: bool) -> str:
        """include_stop's step: release `new_text` up to the end of the first stop string, if one ends in it."""
        if not new_text:
            return ""
        window = self._tail + new_text
        ends = [(start, start + len(s)) for s in self._stop if searching and (start := window.find(s)) >= 0]
        if ends:
            self.is_stopped = True
            return self._release(new_text[: max(0, min(ends)[1] - len(self._tail))])
        self._tail = window[-self._lookback:] if self._lookback else ""
        return self._release(new_text)

    def _find_stop(self, text: str) -> int:
        """Start of the first stop string in `text` (held tail + new text), or -1.

        Searching only this tail is enough: the held tail is the longest end of the earlier text that
        begins a stop string, so a stop string completed by the new text starts inside it.
        """
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits, default=-1)

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of a stop string (held back)."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _release(self, text: str) -> str:
        if text:
            self._released.append(text)
        return text


def update_text(request: Request, decoder: TokenDecoder) -> str:
    """Detokenize the request's new tokens; return the text to stream. A stop string finishes it."""
    if request.detokenizer is None:
        request.detokenizer = IncrementalDetokenizer.for_params(decoder, request.params)
    detokenizer = request.detokenizer
    new_text = detokenizer.step(request.output_token_ids, is_last=request.finish_reason is not None,
                                drop_last=request.ends_on_stop_token)
    if detokenizer.is_stopped:
        request.finish_reason = FinishReason.STOP
    return new_text
