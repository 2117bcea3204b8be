"""Tensors in parts over a stream of messages, so that no message limit caps a tensor's size.

hivemind caps a message at 4 MiB. `to_messages` serialises tensors (hivemind's serialisation), splits each
into parts of at most `PART_BYTES` (`hivemind.utils.streaming.split_for_streaming`; a tensor's first part says
how many it has) and packs the parts, in order, into messages of at most `MESSAGE_BYTES`. `PartsReader`
reassembles them on the other side, refusing more tensors or bytes than the reader allows, so a peer's memory
is bounded by its own limits, whatever a client sends.
"""

from __future__ import annotations

from typing import Iterable

import torch
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from swarm import protocol
from swarm.errors import ProtocolError

PART_BYTES = 1024 * 1024
MESSAGE_BYTES = 2 * 1024 * 1024  # half of hivemind's cap: room for metadata and framing


def to_messages(tensors: Iterable[torch.Tensor], part_bytes: int = PART_BYTES,
                message_bytes: int = MESSAGE_BYTES) -> list[list[runtime_pb2.Tensor]]:
    """The tensors' parts, grouped into messages (at least one message, maybe empty)."""
    messages: list[list[runtime_pb2.Tensor]] = [[]]
    size = 0
    for tensor in tensors:
        for part in split_for_streaming(protocol.serialize_tensors(tensor)[0], part_bytes):
            if messages[-1] and size + len(part.buffer) > message_bytes:
                messages.append([])
                size = 0
            messages[-1].append(part)
            size += len(part.buffer)
    return messages


class PartsReader:
    """Collects parts as messages arrive; `done` once `expected` tensors are complete."""

    def __init__(self, expected: int, max_bytes: int):
        self.expected, self.max_bytes = expected, max_bytes
        self._complete: list[runtime_pb2.Tensor] = []
        self._current: list[runtime_pb2.Tensor] = []
        self._left = 0  # parts still missing from the current tensor
        self._bytes = 0

    @property
    def done(self) -> bool:
        return len(self._complete) == self.expected

    def feed(self, parts: Iterable[runtime_pb2.Tensor]) -> None:
        for part in parts:
            if self.done:
                raise ProtocolError(f"more tensor parts than the {self.expected} tensor(s) announced")
            self._bytes += len(part.buffer)
            if self._bytes > self.max_bytes:
                raise ProtocolError(f"tensors over the limit of {self.max_bytes} bytes")
            if not self._current:
                if part.chunks < 1:
                    raise ProtocolError("a tensor's first part does not say how many parts it has")
                self._left = part.chunks
            self._current.append(part)
            self._left -= 1
            if self._left == 0:
                self._complete.append(combine_from_streaming(self._current))
                self._current = []

    def tensors(self) -> list[torch.Tensor]:
        if not self.done:
            raise ProtocolError(f"the stream ended with {len(self._complete)} of {self.expected} tensor(s)")
        return protocol.deserialize_tensors(self._complete)
