"""Tests of apps.streaming: incremental decoding of streamed tokens, rewinds, stop sequences, bounded work."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import apps.streaming as streaming
from apps.streaming import IncrementalDetokenizer, StreamedText

TEXT = "Héllo wörld 😀🎉 日本語のテキスト — “quotes”\n\n  indented  ✓ naïve café. Ünïcödé ends here 👋"


class ByteTokenizer:
    """Token i is byte i: every character beyond ASCII is split across tokens, as byte-level BPE may do."""

    def __init__(self):
        self.decoded_ids = 0  # ids passed to decode, all calls together

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded_ids += len(ids)
        return bytes(ids).decode("utf-8", errors="replace")


class PieceTokenizer:
    """Token i is PIECES[i]: for stop sequences that straddle tokens."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def ids(self, *pieces: str) -> list[int]:
        return [self.pieces.index(p) for p in pieces]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces[i] for i in ids)


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Words with a leading "▁" whose decoder drops the space before the first word, like Llama's."""
    words = ["<unk>", "</s>", "▁The", "▁capital", "▁is", "▁Paris", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def push_all(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.push(i) for i in ids]


def test_characters_split_across_tokens_come_out_whole():
    tokenizer = ByteTokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = push_all(detokenizer, tokenizer.encode("aé😀"))
    assert pieces == ["a", "", "é", "", "", "", "😀"]
    assert detokenizer.text == "aé😀"


def test_pieces_add_up_to_the_whole_decode_with_the_real_tokenizer(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = push_all(detokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for piece in pieces if piece == "") > 0  # the text does split characters across tokens


def test_a_dropped_leading_space_is_only_dropped_at_the_start():
    tokenizer = sentencepiece_like()
    ids = tokenizer.convert_tokens_to_ids(["▁The", "▁capital", "▁is", "▁Paris", "."])
    assert tokenizer.decode(ids[1:2]) == "capital"  # decoding a token alone loses its space
    pieces = push_all(IncrementalDetokenizer(tokenizer), ids)
    assert pieces == ["The", " capital", " is", " Paris", "."]


def test_special_tokens_are_skipped():
    tokenizer = sentencepiece_like()
    ids = tokenizer.convert_tokens_to_ids(["▁The", "</s>", "▁capital"])
    assert "".join(push_all(IncrementalDetokenizer(tokenizer), ids)) == "The capital"


def test_invalid_bytes_are_passed_on_after_a_while():
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    pieces = push_all(detokenizer, [0xE2] * streaming.MAX_UNFINISHED)  # never a whole character
    assert pieces[:-1] == [""] * (streaming.MAX_UNFINISHED - 1) and pieces[-1].startswith("\ufffd")
    assert detokenizer.push(ord("a")) == "a"


def test_flush_passes_on_an_unfinished_character():
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    assert push_all(detokenizer, [ord("a"), 0xC3]) == ["a", ""]
    assert detokenizer.flush() == "\ufffd" and detokenizer.text == "a\ufffd"
    assert detokenizer.flush() == ""


@pytest.mark.parametrize("kept", range(0, 12))
def test_rewind_goes_on_as_if_the_dropped_tokens_never_came(kept):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("aé😀bç")  # 10 bytes; some rewinds land inside a character
    detokenizer = IncrementalDetokenizer(tokenizer)
    push_all(detokenizer, ids)
    detokenizer.rewind(kept)
    assert detokenizer.tokens == ids[:kept]
    more = tokenizer.encode("→z")
    push_all(detokenizer, more)
    assert detokenizer.text == tokenizer.decode(ids[:kept] + more)


def test_random_rewinds_match_a_whole_decode():
    rng = random.Random(0)
    tokenizer = ByteTokenizer()
    source = tokenizer.encode(TEXT * 3)
    detokenizer = IncrementalDetokenizer(tokenizer)
    for _ in range(200):
        if detokenizer.tokens and rng.random() < 0.1:
            detokenizer.rewind(rng.randrange(len(detokenizer.tokens) + 1))
        else:
            detokenizer.push(source[len(detokenizer.tokens) % len(source)])
        whole = tokenizer.decode(detokenizer.tokens)
        unfinished = len(whole) - len(whole.rstrip("\ufffd"))
        assert detokenizer.text == whole[: len(whole) - unfinished]


def test_work_per_token_is_bounded(monkeypatch):
    """Decoding and the stop-sequence search look at a few recent tokens, not the whole answer again."""
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("A long answer, with ünïcödé 😀 now and then. " * 20)[:500]
    searched = []  # lengths of the texts searched for stop sequences
    original = streaming.sendable
    monkeypatch.setattr(streaming, "sendable", lambda text, *args: searched.append(len(text)) or original(text, *args))
    streamer = StreamedText(tokenizer, stop=("THE END", "\n\n"))
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt: not decoded
    for token in ids:
        streamer.put(torch.tensor([token]))
    assert streamer.finish() == tokenizer.decode(ids)
    assert len(ids) == 500
    assert tokenizer.decoded_ids <= 8 * len(ids)  # re-decoding from the start each time: ~125,000
    assert max(searched) <= 16 and sum(searched) <= 8 * len(ids)


def test_stop_sequences_across_token_boundaries_are_held_back_then_cut():
    tokenizer = PieceTokenizer(["The ans", "wer is Pa", "r", "is, Fr", "ance", "Pa", "ly"])
    sent: list[str] = []
    streamer = StreamedText(tokenizer, stop=("Paris",), on_text=sent.append)
    streamer.put(torch.tensor([[0]]))
    for token in tokenizer.ids("The ans", "wer is Pa", "r"):
        streamer.put(torch.tensor([token]))
    assert "".join(sent) == "The answer is " and not streamer.stopped  # "Par" may begin "Paris"
    streamer.put(torch.tensor(tokenizer.ids("is, Fr")))
    assert streamer.stopped and streamer.finish() == "The answer is " == "".join(sent)


def test_held_back_text_that_is_not_a_stop_goes_out():
    tokenizer = PieceTokenizer(["The ans", "wer is Pa", "r", "ly", "Pa"])
    sent: list[str] = []
    streamer = StreamedText(tokenizer, stop=("Paris",), on_text=sent.append)
    streamer.put(torch.tensor([[0]]))
    for token in tokenizer.ids("wer is Pa", "r", "ly", "Pa"):
        streamer.put(torch.tensor([token]))
    assert "".join(sent) == "wer is Parly"
    assert streamer.finish() == "wer is ParlyPa" == "".join(sent) and not streamer.stopped


def test_rewind_restores_held_back_text():
    tokenizer = PieceTokenizer(["It is Pa", "r", "xq", "is", "."])
    sent: list[str] = []
    streamer = StreamedText(tokenizer, stop=("Paris",), on_text=sent.append)
    streamer.put(torch.tensor([[0]]))
    for token in tokenizer.ids("It is Pa", "r", "xq"):
        streamer.put(torch.tensor([token]))
    assert "".join(sent) == "It is Parxq"
    streamer.rewind(2)  # "xq" is dropped: "Par" is held back again
    assert streamer.sent == "It is "
    streamer.put(torch.tensor(tokenizer.ids("is")))
    assert streamer.stopped and streamer.finish() == "It is "
