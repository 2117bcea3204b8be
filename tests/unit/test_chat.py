"""Tests of apps.chat's pure parts: reusing the fed prefix, turn statistics, the terminal streamer."""

from __future__ import annotations

import io

import pytest
import torch

from apps.chat import TerminalStreamer, TurnStats, common_prefix_length


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([], [], 0),
        ([], [1, 2], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2, 3, 4, 5], 3),
        ([1, 2, 3, 4, 5], [1, 2, 3], 3),
        ([1, 2, 9, 4], [1, 2, 3, 4], 2),
        ([7], [8], 0),
    ],
)
def test_common_prefix_length(a, b, expected):
    assert common_prefix_length(a, b) == expected
    assert common_prefix_length(b, a) == expected


def test_stats_before_any_token():
    stats = TurnStats(prompt_tokens=5, started=10.0)
    assert stats.time_to_first_token is None
    assert stats.tokens_per_second is None
    assert stats.summary() == "0 tokens, time to first token -, - tokens/s"


def test_stats_with_one_token_have_no_speed():
    stats = TurnStats(new_tokens=1, started=10.0, first_token_at=10.25, last_token_at=10.25)
    assert stats.time_to_first_token == pytest.approx(0.25)
    assert stats.tokens_per_second is None
    assert stats.summary() == "1 tokens, time to first token 250 ms, - tokens/s"


def test_stats_speed_counts_tokens_after_the_first():
    # 9 tokens after the first, in 2 seconds
    stats = TurnStats(prompt_tokens=3, new_tokens=10, started=100.0, first_token_at=100.5, last_token_at=102.5)
    assert stats.time_to_first_token == pytest.approx(0.5)
    assert stats.tokens_per_second == pytest.approx(4.5)
    assert stats.summary() == "10 tokens, time to first token 500 ms, 4.5 tokens/s"


def test_stats_with_speculative_decoding_say_how_many_tokens_each_round_trip_brought():
    stats = TurnStats(new_tokens=10, started=100.0, first_token_at=100.5, last_token_at=102.5, round_trips=4)
    assert stats.summary() == "10 tokens, time to first token 500 ms, 4.5 tokens/s, 4 round trips (2.50 tokens each)"


def test_stats_speed_with_no_elapsed_time_is_finite():
    stats = TurnStats(new_tokens=3, started=0.0, first_token_at=1.0, last_token_at=1.0)
    assert stats.tokens_per_second == pytest.approx(2 / 1e-9)


class CharTokenizer:
    """Token i is chr(i); 0xFFFD stands for half a multi-byte character."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def test_terminal_streamer_skips_the_prompt_prints_tokens_and_times_them():
    stats = TurnStats(started=0.0)
    out = io.StringIO()
    streamer = TerminalStreamer(CharTokenizer(), stats, out)
    streamer.put(torch.tensor([[ord("x"), ord("y")]]))  # the prompt
    assert out.getvalue() == "" and stats.new_tokens == 0
    for char in "hi!":
        streamer.put(torch.tensor([ord(char)]))
    streamer.end()
    assert out.getvalue() == "hi!\n"
    assert stats.new_tokens == 3
    assert stats.first_token_at is not None and stats.last_token_at >= stats.first_token_at > 0
    assert streamer.tokens == [ord("h"), ord("i"), ord("!")]


def test_terminal_streamer_waits_for_a_whole_character():
    out = io.StringIO()
    streamer = TerminalStreamer(CharTokenizer(), TurnStats(), out)
    streamer.put(torch.tensor([[1]]))
    streamer.put(torch.tensor([ord("a")]))
    streamer.put(torch.tensor([0xFFFD]))  # incomplete: nothing printed yet
    assert out.getvalue() == "a"


def test_terminal_streamer_rewind_says_so_and_reprints_the_kept_part():
    out = io.StringIO()
    stats = TurnStats(started=0.0)
    streamer = TerminalStreamer(CharTokenizer(), stats, out)
    streamer.put(torch.tensor([[1]]))
    for char in "Paxq":
        streamer.put(torch.tensor([ord(char)]))
    streamer.rewind(2)  # "xq" came from a peer since caught cheating
    for char in "ris":
        streamer.put(torch.tensor([ord(char)]))
    streamer.end()
    assert out.getvalue() == "Paxq\n[a peer on the route was caught returning wrong results; answering again]\nParis\n"
    assert streamer.tokens == [ord(c) for c in "Paris"] and stats.new_tokens == 5


class ByteTokenizer:
    """Token i is byte i, so characters beyond ASCII arrive in several tokens; counts the ids decoded."""

    decoded_ids = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded_ids += len(ids)
        return bytes(ids).decode("utf-8", errors="replace")


def test_terminal_streamer_prints_characters_split_across_tokens_whole():
    out = io.StringIO()
    streamer = TerminalStreamer(ByteTokenizer(), TurnStats(), out)
    streamer.put(torch.tensor([[1]]))
    printed = []
    for byte in "é😀!".encode():
        streamer.put(torch.tensor([byte]))
        printed.append(out.getvalue())
    assert printed == ["", "é", "é", "é", "é", "é😀", "é😀!"]
    assert "\ufffd" not in out.getvalue()


def test_terminal_streamer_rewind_inside_a_character():
    out = io.StringIO()
    stats = TurnStats()
    streamer = TerminalStreamer(ByteTokenizer(), stats, out)
    streamer.put(torch.tensor([[1]]))
    for byte in "aé".encode():
        streamer.put(torch.tensor([byte]))
    streamer.rewind(2)  # "a" and the first byte of "é"
    for byte in (0xA8, ord("!")):  # the second byte of "è" (C3 A8), then "!"
        streamer.put(torch.tensor([byte]))
    streamer.end()
    assert out.getvalue() == "aé\n[a peer on the route was caught returning wrong results; answering again]\naè!\n"
    assert stats.new_tokens == 4


def test_terminal_streamer_decodes_a_few_tokens_per_step():
    tokenizer = ByteTokenizer()
    out = io.StringIO()
    streamer = TerminalStreamer(tokenizer, TurnStats(), out)
    streamer.put(torch.tensor([[1]]))
    answer = ("Streaming ünïcödé 😀, token by token. " * 20).encode()[:500]
    for byte in answer:
        streamer.put(torch.tensor([byte]))
    assert out.getvalue() == answer.decode(errors="ignore")
    assert tokenizer.decoded_ids <= 8 * len(answer)  # decoding from the start each time: ~125,000


class ChatModel:
    """Just what ChatSession uses of a client: a tokenizer, sessions and a generate that reports coverage."""

    def __init__(self, coverage, decoding=None):
        self.coverage, self.decoding = coverage, decoding
        self.tokenizer = self
        self.generated: list[dict] = []

    def apply_chat_template(self, messages, **kwargs) -> list[int]:
        return [ord(c) for m in messages for c in f"<{m['content']}>"]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)

    def inference_session(self, max_length: int):
        class Session:
            def rollback(self, position: int) -> None:
                pass

            def close(self) -> None:
                pass

        return Session()

    def generate(self, input_ids, **kwargs):
        from swarm.client import GenerateOutput, GenerationReport

        self.generated.append(kwargs)
        answer = torch.tensor([[ord(c) for c in "ok"]])
        kwargs["streamer"].put(input_ids)
        kwargs["streamer"].put(answer[0])
        kwargs["streamer"].end()
        report = GenerationReport(self.coverage, checked=True)
        if self.decoding is not None:
            report = GenerationReport(self.coverage, checked=True, decoding=self.decoding)
        return GenerateOutput(torch.cat([input_ids, answer], dim=1), report)


@pytest.mark.parametrize("verified, mark", [(40, ""), (12, "[verified 12 of 40 steps: not fully verified]\n")])
def test_an_answer_not_fully_verified_is_marked_under_it(capsys, verified, mark):
    from apps.chat import ChatSession
    from swarm.hooks import Coverage

    model = ChatModel(Coverage(steps=40, verified=verified))
    chat = ChatSession(model, max_length=200, max_new_tokens=8, temperature=0.0, top_p=1.0)
    assert chat.ask("hi", out=io.StringIO()) == "ok"
    assert capsys.readouterr().err == mark
    assert chat.last_report.verified == verified and model.generated[0]["return_dict_in_generate"]


def test_prompt_lookup_reaches_generate_and_the_turn_counts_round_trips():
    from apps.chat import ChatSession
    from swarm.generation import DecodeStats
    from swarm.hooks import Coverage

    model = ChatModel(Coverage(steps=4, verified=4), DecodeStats(round_trips=1, new_tokens=2))
    chat = ChatSession(model, max_length=200, max_new_tokens=8, temperature=0.0, top_p=1.0, prompt_lookup=5)
    chat.ask("hi", out=io.StringIO())
    assert model.generated[0]["prompt_lookup_num_tokens"] == 5
    assert chat.last_stats.round_trips == 1 and chat.last_stats.summary().endswith("1 round trips (2.00 tokens each)")
    plain = ChatSession(model, max_length=200, max_new_tokens=8, temperature=0.0, top_p=1.0)
    plain.ask("hi", out=io.StringIO())
    assert model.generated[1]["prompt_lookup_num_tokens"] == 0 and plain.last_stats.round_trips is None


def test_strict_mode_checks_every_step_and_waits():
    from swarm.config import STRICT, ClientConfig

    assert ClientConfig(initial_peers=(), **STRICT).strict
    assert not ClientConfig(initial_peers=()).strict and not ClientConfig(initial_peers=(), check_rate=0.5).strict
    assert not ClientConfig(initial_peers=(), spot_checks=False, **STRICT).strict
