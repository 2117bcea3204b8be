"""Exceptions raised by the swarm client and shared code.

    SwarmError
    ├── ModelError                  a model cannot be found, fetched, converted or loaded
    │   ├── UnknownModelError       the name matches no alias, directory or cached repository
    │   └── UnsupportedModelError   found, but not a Llama-family checkpoint
    ├── ConfigError                 a bad command-line value (block range, multiaddr, dtype ...)
    ├── ProtocolError               a message that cannot be decoded (the peer answers `bad_request`)
    ├── SwarmConnectionError        the DHT or a peer cannot be reached
    ├── MissingBlocksError          no peer serves some blocks (after waiting)
    └── PeerError                   one peer failed a request (`.peer` names it, so it is the one blamed)
        ├── PeerUnreachableError    ...it cannot be reached, timed out or dropped the stream (also a SwarmConnectionError)
        ├── RemoteError             ...it answered with an error (carries its kind, e.g. "bad_request", "unknown_session")
        └── BadReplyError           ...it answered with something invalid: undecodable, the wrong shape, NaN or infinity
            └── BadReceiptError     ...its reply carried no valid receipt for exactly the work asked of it

Every message is one line meant for a user: it says what went wrong and, where it can, what to do.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base class of every error this project raises on purpose."""


class ModelError(SwarmError):
    """A model cannot be found, fetched, converted or loaded."""


class UnknownModelError(ModelError):
    """The model name matches no alias, local directory or cached Hugging Face repository."""


class UnsupportedModelError(ModelError):
    """The checkpoint exists but is not of a supported (Llama-family) architecture."""


class ConfigError(SwarmError):
    """A user-supplied setting is invalid (block range, multiaddr, dtype, ...)."""


class ProtocolError(SwarmError):
    """A message that cannot be decoded."""


class SwarmConnectionError(SwarmError):
    """The DHT or a peer cannot be reached."""


class PeerError(SwarmError):
    """One peer failed a request; `peer` is its id (base58), the one to blame."""

    def __init__(self, peer: str, message: str):
        self.peer = str(peer)
        super().__init__(message)


class PeerUnreachableError(PeerError, SwarmConnectionError):
    """The peer cannot be reached, did not answer in time, or dropped the stream."""


class BadReplyError(PeerError):
    """The peer answered with something invalid: undecodable bytes, a wrong shape, NaN or infinity."""

    def __init__(self, peer: str, problem: str):
        self.problem = problem
        super().__init__(peer, f"peer {peer} sent an invalid reply: {problem}")


class BadReceiptError(BadReplyError):
    """The peer's reply came without a valid receipt for it: missing, forged, signed by another peer, not
    matching the tensors sent and returned, naming other work, or claiming more tokens than were sent."""

    def __init__(self, peer: str, problem: str):
        self.problem = problem
        PeerError.__init__(self, peer, f"peer {peer} sent a reply without a valid receipt: {problem}")


class MissingBlocksError(SwarmError):
    """Some blocks of the model are served by no reachable peer."""

    def __init__(self, model: str, missing: list[int], undialable: list[str] | None = None, left_out: str = ""):
        self.model = model
        self.missing = list(missing)
        self.undialable = list(undialable or [])  # peers that serve some of them but cannot be dialled
        spans = format_block_spans(self.missing)
        behind_nat = (
            f" (peer {', '.join(self.undialable)} serves some but cannot be dialled: behind NAT without a relay)"
            if self.undialable else ""
        )
        left_out = f" ({left_out})" if left_out else ""  # why a peer that serves them is not used
        super().__init__(
            f"no reachable peer serves block(s) {spans} of {model}{behind_nat}{left_out}; start one with "
            f"`swarm-peer join --model {model} --blocks {_first_span(self.missing)}`"
        )


class RemoteError(PeerError):
    """A peer answered a request with an error."""

    def __init__(self, peer: str, kind: str, message: str):
        self.kind = kind
        self.remote_message = message
        super().__init__(peer, f"peer {peer} refused the request ({kind}): {message}")


def format_block_spans(blocks: list[int]) -> str:
    """[0, 1, 2, 7] -> '0-2, 7'."""
    spans: list[str] = []
    for start, end in _runs(sorted(set(blocks))):
        spans.append(str(start) if start == end - 1 else f"{start}-{end - 1}")
    return ", ".join(spans)


def _first_span(blocks: list[int]) -> str:
    start, end = next(_runs(sorted(set(blocks))), (0, 0))
    return f"{start}:{end}"


def _runs(sorted_blocks: list[int]):
    """Yield half-open [start, end) runs of consecutive integers."""
    if not sorted_blocks:
        return
    start = prev = sorted_blocks[0]
    for block in sorted_blocks[1:]:
        if block != prev + 1:
            yield start, prev + 1
            start = block
        prev = block
    yield start, prev + 1
