"""Tests of the delaying TCP relay (peers.testing.netem): two local sockets, no model, no swarm."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from peers.testing.netem import DelayRelay, LinkClock, LinkConfig, RelayProcess

DELAY = 0.05  # one way, seconds
RECORD = 1024  # bytes per numbered record: 4-byte index, then random bytes
SLACK = 0.001  # timers fire on the event loop's clock; allow a millisecond of rounding


def test_each_chunk_arrives_its_delay_after_it_was_sent():
    clock = LinkClock()
    config = LinkConfig(delay=0.05)
    assert clock.arrival(1.0, 100, config) == pytest.approx(1.05)
    assert clock.arrival(1.001, 100, config) == pytest.approx(1.051)  # in flight together, not one after the other


def test_a_bandwidth_cap_queues_chunks_behind_each_other():
    clock = LinkClock()
    config = LinkConfig(delay=0.01, bandwidth=1000.0)  # bytes per second
    assert clock.arrival(0.0, 100, config) == pytest.approx(0.11)  # 0.1 s to send, then the delay
    assert clock.arrival(0.0, 100, config) == pytest.approx(0.21)  # waits for the first to be sent
    assert clock.arrival(5.0, 100, config) == pytest.approx(5.11)  # an idle link starts afresh


def test_lowering_the_delay_keeps_the_order():
    clock = LinkClock()
    first = clock.arrival(0.0, 10, LinkConfig(delay=0.1))
    assert clock.arrival(0.01, 10, LinkConfig(delay=0.0)) >= first


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def relay_round_trips(records: int, gap: float) -> tuple[list[float], list[float], list[bytes], list[bytes]]:
    """Send numbered records `gap` seconds apart through a relay to an echo server; (send times, echo times,
    records sent, records echoed)."""
    loop = asyncio.get_running_loop()
    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with target, DelayRelay(target.sockets[0].getsockname()[1], LinkConfig(delay=DELAY)) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        sent = [struct.pack(">I", i) + os.urandom(RECORD - 4) for i in range(records)]
        sent_at: list[float] = []

        async def send() -> None:
            for record in sent:
                sent_at.append(loop.time())
                writer.write(record)
                await writer.drain()
                await asyncio.sleep(gap)

        async def receive() -> tuple[list[float], list[bytes]]:
            times, echoed = [], []
            for _ in range(records):
                echoed.append(await reader.readexactly(RECORD))
                times.append(loop.time())
            return times, echoed

        _, (echoed_at, echoed) = await asyncio.gather(send(), receive())
        writer.close()
        assert relay.stats.connections == 1
        assert relay.stats.bytes_to_target == relay.stats.bytes_from_target == records * RECORD
    return sent_at, echoed_at, sent, echoed


def test_bytes_come_back_intact_in_order_and_not_before_the_delay_each_way():
    sent_at, echoed_at, sent, echoed = asyncio.run(relay_round_trips(records=10, gap=0.0))
    assert echoed == sent
    for sent_time, echoed_time in zip(sent_at, echoed_at):
        assert echoed_time - sent_time >= 2 * DELAY - SLACK  # through the relay and back: the delay twice


def test_many_chunks_in_flight_are_not_serialised_by_the_delay():
    records, gap = 20, 0.005  # a record every 5 ms, ten times faster than one delay
    sent_at, echoed_at, sent, echoed = asyncio.run(relay_round_trips(records, gap))
    assert echoed == sent
    # one after another they would take records x 2 x DELAY (2 s); in flight together, the last one comes back
    # about one round trip after it was sent
    assert echoed_at[-1] - sent_at[-1] < 2 * DELAY + 0.1
    assert echoed_at[-1] - sent_at[0] < records * gap + 2 * DELAY + 0.15


def test_a_large_transfer_arrives_intact():
    async def transfer() -> tuple[bytes, bytes]:
        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        async with target, DelayRelay(target.sockets[0].getsockname()[1], LinkConfig(delay=0.005)) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            payload = os.urandom(4 * 2**20)
            writer.write(payload)
            writer.write_eof()  # half-close: the echo still comes back
            echoed = await reader.read()  # up to EOF, which the relay passes on after the last byte
            writer.close()
            return payload, echoed

    payload, echoed = asyncio.run(transfer())
    assert echoed == payload


def test_closing_the_relay_cuts_open_connections_and_a_missing_target_is_refused():
    async def scenario() -> tuple[bytes, bytes]:
        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        target_port = target.sockets[0].getsockname()[1]
        async with target:
            relay = DelayRelay(target_port)
            await relay.start()
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            await relay.close()
            cut = await asyncio.wait_for(reader.read(), timeout=2)
            writer.close()
        async with DelayRelay(target_port) as orphan:  # the target stopped listening
            reader, writer = await asyncio.open_connection("127.0.0.1", orphan.port)
            refused = await asyncio.wait_for(reader.read(), timeout=2)
            writer.close()
        return cut, refused

    assert asyncio.run(scenario()) == (b"", b"")


def test_relays_in_their_own_process_report_ports_take_a_new_delay_and_count_bytes():
    async def serve_one_round_trip(relay_port: int) -> float:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
        began = loop.time()
        writer.write(b"x" * 100)
        await reader.readexactly(100)
        writer.close()
        return loop.time() - began

    async def with_target(run) -> None:
        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        async with target:
            await run(target.sockets[0].getsockname()[1])

    async def run(target_port: int) -> None:
        with RelayProcess([target_port], delay_ms=0) as relays:
            relay_port = relays.ports[target_port]
            assert await serve_one_round_trip(relay_port) < 2 * DELAY
            await asyncio.get_running_loop().run_in_executor(None, relays.set_delay, DELAY * 1000)
            assert await serve_one_round_trip(relay_port) >= 2 * DELAY - SLACK
            stats = relays.stats()[target_port]
            assert (stats.connections, stats.bytes_to_target, stats.bytes_from_target) == (2, 200, 200)

    asyncio.run(with_target(run))
