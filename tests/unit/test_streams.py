"""Reply streams end as soon as their connection does (`swarm.streams`), with two real p2p daemons on loopback."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from swarm.streams import open_reply_stream


class Echo(ServicerBase):
    """Answers a request with its uid, except one named "hang", which it never answers."""

    async def rpc_echo(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
                       ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for request in requests:
            if request.uid == "hang":
                await asyncio.Event().wait()
            yield runtime_pb2.ExpertResponse(metadata=request.uid.encode())


async def _pair() -> tuple[P2P, P2P]:
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    await Echo().add_p2p_handlers(server)
    client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
    return server, client


def test_replies_come_in_order_and_end_when_the_requests_do():
    async def scenario() -> list[bytes]:
        server, client = await _pair()
        try:
            async def requests():
                for uid in ("a", "b", "c"):
                    yield runtime_pb2.ExpertRequest(uid=uid)

            replies = await open_reply_stream(client, server.peer_id, Echo, "rpc_echo", requests())
            return [reply.metadata async for reply in replies]
        finally:
            await client.shutdown()
            await server.shutdown()

    assert asyncio.run(scenario()) == [b"a", b"b", b"c"]


def test_a_reply_awaited_from_a_peer_that_dies_ends_the_stream_at_once_though_requests_stay_open():
    async def scenario() -> tuple[type, float]:
        server, client = await _pair()
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests():  # open like a session's: it ends only when told
            while (request := await outbox.get()) is not None:
                yield request

        try:
            replies = await open_reply_stream(client, server.peer_id, Echo, "rpc_echo", requests())
            outbox.put_nowait(runtime_pb2.ExpertRequest(uid="hang"))
            waiting = asyncio.ensure_future(anext(replies))
            await asyncio.sleep(0.5)
            began = time.monotonic()
            await server.shutdown()  # its p2p daemon exits: the connection closes
            try:
                await asyncio.wait_for(waiting, timeout=20)
                ended = type(None)
            except StopAsyncIteration:
                ended = StopAsyncIteration
            return ended, time.monotonic() - began
        finally:
            outbox.put_nowait(None)
            await client.shutdown()

    ended, seconds = asyncio.run(scenario())
    assert ended is StopAsyncIteration and seconds < 10  # hivemind's own stub waited here until the next request
