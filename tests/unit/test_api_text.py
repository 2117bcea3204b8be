"""Stop sequences over streamed text, and the API's request validation (pure parts of apps.api)."""

import threading

import pytest
import torch
from pydantic import ValidationError

from apps.api.backend import TextCollector, _Finished

from apps.api.schema import ChatCompletionRequest, CompletionRequest
from apps.api.text import find_stop, held_back, sendable


def test_find_stop_takes_the_earliest_stop():
    assert find_stop("Paris is nice. Rome too.", ("Rome", ".")) == 13
    assert find_stop("Paris", ("Rome",)) is None


def test_text_that_may_begin_a_stop_is_held_back():
    assert held_back("The answer is Par", ("Paris",)) == 3
    assert held_back("The answer", ("Paris",)) == 0
    assert held_back("ab", ("bc", "abx")) == 2  # the longest possible start wins
    assert sendable("The answer is Par", ("Paris",), final=False) == ("The answer is ", False)
    assert sendable("The answer is Par", ("Paris",), final=True) == ("The answer is Par", False)
    assert sendable("It is Paris, France", ("Paris",), final=False) == ("It is ", True)
    assert sendable("anything", (), final=False) == ("anything", False)


def test_requests_are_validated_like_openai():
    ok = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                               stop="x", unknown_field=1)
    assert ok.messages[0].text() == "hi" and ok.stop_sequences() == ("x",) and ok.temperature == 1.0
    assert ChatCompletionRequest(model="m", messages=[{"role": "developer", "content": "be brief"}],
                                 max_completion_tokens=5).token_limit() == 5
    for bad in (dict(messages=[]), dict(n=2), dict(temperature=-0.1), dict(top_p=0), dict(max_tokens=0),
                dict(stop=["a"] * 5), dict(stop=[""]), dict(messages=[{"role": "robot", "content": "x"}])):
        fields = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **bad}
        with pytest.raises(ValidationError):
            ChatCompletionRequest(**fields)
    assert CompletionRequest(model="m", prompt=["one"]).prompt_text() == "one"
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt=["one", "two"])
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="x", echo=True)


class _CharTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


def _collector(on_text=None) -> TextCollector:
    return TextCollector(_CharTokenizer(), ("\n\n",), (0,), on_text, threading.Event())


def _feed(collector: TextCollector, text: str) -> None:
    for char in text:
        collector.put(torch.tensor([ord(char)]))


def test_a_rewind_drops_untrusted_tokens_from_a_whole_answer():
    collector = _collector()
    collector.put(torch.tensor([[1, 2]]))  # the prompt
    _feed(collector, "Paxq")
    collector.rewind(2)
    _feed(collector, "ris")
    assert collector.finish() == "Paris" and len(collector.tokens) == 5


def test_a_rewind_while_streaming_goes_on_from_the_kept_tokens():
    pieces: list[str] = []
    collector = _collector(pieces.append)
    collector.put(torch.tensor([[1, 2]]))
    _feed(collector, "Paxq")
    collector.rewind(2)  # "xq" was streamed already and cannot be taken back
    _feed(collector, "ris")
    collector.finish()
    assert "".join(pieces) == "Paxq" + "ris"
    assert collector.retracted  # the answer is flagged: text it streamed was taken back


def test_a_rewind_of_tokens_not_streamed_yet_retracts_nothing():
    pieces: list[str] = []
    collector = TextCollector(_PieceTokenizer(), ("Paris",), (0,), pieces.append, threading.Event())
    collector.put(torch.tensor([[1]]))
    _put_pieces(collector, "The answer", " is Pa", "r")  # "Par" is held back: it may begin "Paris"
    collector.rewind(2)
    assert not collector.retracted and "".join(pieces) == "The answer is "
    whole = _collector()
    whole.put(torch.tensor([[1, 2]]))
    _feed(whole, "Paxq")
    whole.rewind(2)
    assert not whole.retracted  # nothing of a whole answer was out yet


class _PieceTokenizer:
    PIECES = ["", "The answer", " is Pa", "r", "is.", "\n", "\nmore", "\xc3", "\xa9"]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.PIECES[i] for i in ids).encode("latin-1").decode("utf-8", errors="replace")


def _put_pieces(collector: TextCollector, *pieces: str) -> None:
    for piece in pieces:
        collector.put(torch.tensor([_PieceTokenizer.PIECES.index(piece)]))


def test_a_stop_sequence_across_tokens_is_never_streamed():
    pieces: list[str] = []
    collector = TextCollector(_PieceTokenizer(), ("Paris",), (0,), pieces.append, threading.Event())
    collector.put(torch.tensor([[1, 2]]))
    _put_pieces(collector, "The answer", " is Pa", "r")
    assert "".join(pieces) == "The answer is " and not collector.stopped
    assert not collector.stopping(None, None)
    _put_pieces(collector, "is.")
    assert collector.stopped and collector.stopping(None, None)  # the criterion ends generation
    assert collector.finish() == "The answer is " == "".join(pieces)


def test_a_stop_sequence_split_over_newline_tokens():
    pieces: list[str] = []
    collector = TextCollector(_PieceTokenizer(), ("\n\n",), (0,), pieces.append, threading.Event())
    collector.put(torch.tensor([[1]]))
    _put_pieces(collector, "The answer", "\n")
    assert "".join(pieces) == "The answer"  # the newline may begin "\n\n"
    _put_pieces(collector, "\nmore")
    assert collector.finish() == "The answer" and collector.stopping(None, None)


def test_a_character_split_across_tokens_is_streamed_whole():
    pieces: list[str] = []
    collector = TextCollector(_PieceTokenizer(), (), (0,), pieces.append, threading.Event())
    collector.put(torch.tensor([[1]]))
    _put_pieces(collector, "r", "\xc3")
    assert pieces == ["r"]
    _put_pieces(collector, "\xa9")
    assert pieces == ["r", "é"] and collector.finish() == "ré"


def test_an_unfinished_last_character_ends_a_whole_answer():
    collector = TextCollector(_PieceTokenizer(), (), (0,), None, threading.Event())
    collector.put(torch.tensor([[1]]))
    _put_pieces(collector, "r", "\xc3")
    assert collector.finish() == "r\ufffd"


def test_eos_and_cancellation():
    cancelled = threading.Event()
    collector = TextCollector(_PieceTokenizer(), (), (0,), None, cancelled)
    collector.put(torch.tensor([[1]]))
    _put_pieces(collector, "r", "")
    assert collector.saw_eos
    collector.rewind(1)
    assert not collector.saw_eos
    cancelled.set()
    with pytest.raises(_Finished):
        _put_pieces(collector, "r")
    assert collector.tokens == [3]


class _ReportingModel:
    """What SwarmBackend uses of a client: a tokenizer, eos ids and a generate that reports coverage."""

    eos_token_ids = (0,)

    def __init__(self, answer: str, coverage):
        self.tokenizer = _CharTokenizer()
        self.answer, self.coverage = answer, coverage
        self.calls: list[dict] = []

    def generate(self, input_ids, **kwargs):
        from swarm.client import GenerateOutput, GenerationReport

        self.calls.append(kwargs)
        streamer, sequences = kwargs["streamer"], input_ids
        streamer.put(input_ids)
        for char in self.answer:
            token = torch.tensor([ord(char)])
            streamer.put(token)
            sequences = torch.cat([sequences, token[None]], dim=1)
            if kwargs["stopping_criteria"](sequences, None):
                break
        return GenerateOutput(sequences, GenerationReport(self.coverage, checked=True))


@pytest.mark.parametrize("strict", [False, True])
def test_the_backend_reports_verification_and_ends_at_stop_sequences(strict):
    from apps.api.backend import GenerationParams, SwarmBackend
    from swarm.hooks import Coverage

    model = _ReportingModel("Paris.\n\nMore", Coverage(steps=10, verified=3))
    backend = SwarmBackend(model, max_length=64, default_max_tokens=16, workers=1, strict=strict)
    params = GenerationParams(None, 0.0, 1.0, ("\n\n",))
    result = backend.generate([ord("Q")], params)
    assert (result.text, result.finish_reason) == ("Paris.", "stop")
    assert result.verification.model_dump() == {"coverage": 0.3, "verified_steps": 3, "steps": 10, "flagged": True}
    streamed: list[str] = []
    backend.generate([ord("Q")], params, on_text=streamed.append)
    assert "".join(streamed) == "Paris."
    assert [call["settle_checks"] for call in model.calls] == [None, None if strict else False]
    model.coverage = Coverage(steps=10, verified=10)
    assert not backend.generate([ord("Q")], params).verification.flagged
    backend.shutdown()


def test_the_backend_passes_prompt_lookup_on():
    from apps.api.backend import GenerationParams, SwarmBackend
    from swarm.hooks import Coverage

    model = _ReportingModel("Paris.", Coverage(steps=1, verified=1))
    for lookup in (0, 6):
        backend = SwarmBackend(model, max_length=64, default_max_tokens=16, workers=1, prompt_lookup=lookup)
        backend.generate([ord("Q")], GenerationParams(None, 0.0, 1.0, ()))
        backend.shutdown()
    assert [call["prompt_lookup_num_tokens"] for call in model.calls] == [0, 6]


def test_only_the_final_chunk_carries_verification():
    from apps.api.app import chat_chunk, completion_chunk
    from apps.api.schema import Verification

    verification = Verification(coverage=1.0, verified_steps=4, steps=4, flagged=False)
    for make in (chat_chunk, completion_chunk):
        chunk = make("id", "m")
        assert "verification" not in chunk("text", None)
        assert chunk(None, "stop", verification)["verification"] == verification.model_dump()
