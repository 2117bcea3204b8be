"""Streaming RPC calls over hivemind's P2P whose replies end as soon as the connection does.

hivemind's streaming stubs (`ServicerBase.get_stub(...).rpc_x(requests)`), on a closed connection, wait for the
request iterator to end before they end the replies. A session's requests end only when the session does, so a
client awaiting a reply from a peer that was SIGKILLed meanwhile waited out its whole request timeout (60 s), until
it sent another request. Here the replies end at once, and the writer is stopped.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from hivemind.p2p import P2P, P2PHandlerError, PeerID, ServicerBase
from hivemind.proto import runtime_pb2


async def open_reply_stream(
    p2p: P2P, peer_id: PeerID, servicer: type[ServicerBase], method: str,
    requests: AsyncIterator[runtime_pb2.ExpertRequest],
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """Call `servicer`'s streaming `method` on `peer_id` with `requests`; the replies, which stop (the iterator ends)
    when the peer ends the stream or the connection closes. Raises what hivemind raises when the stream cannot open."""
    name = servicer._get_handle_name(None, method)  # as `servicer.get_stub(...)` names it (no namespace)
    _, reader, writer = await p2p.call_binary_stream_handler(peer_id, name)

    async def write() -> None:
        async for request in requests:
            await P2P.send_protobuf(request, writer)
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)

    writing = asyncio.create_task(write(), name=f"requests to {peer_id}")

    async def read() -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            while True:
                try:
                    reply, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
                except asyncio.IncompleteReadError:  # the peer ended the stream, or the connection closed
                    return
                if error is not None:
                    raise P2PHandlerError(f"{method} at {peer_id} failed: {error.message}")
                yield reply
        finally:
            writing.cancel()
            writer.close()

    return read()
