"""The engines' HTTP/1.1 client against real sockets: scripted servers that answer well, badly, slowly or not at all.

Each test runs on asyncio's loop and on uvloop's (the gateway's processes run uvloop; in-process tests run asyncio)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from appliance.lib import httpclient
from appliance.lib.httpclient import AnswerBroken, ConnectFailed, EngineClient, PoolBusy

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    if request.param == "uvloop":
        return lambda coroutine: uvloop.run(coroutine)
    return asyncio.run


class Server:
    """A scripted HTTP server: ``handler`` runs once per connection; what it read is kept."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.closed_by_client = asyncio.Event()
        self.written = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and Content-Length body), or None at the connection's end."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await self.handler(reader, writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
    while (request := await server.request(reader)) is not None:
        writer.write(ok(b'{"echo": %d}' % len(request)))
        await writer.drain()


def client(pool_size: int = 8, read_timeout_s: float = 5.0, connect_timeout_s: float = 2.0) -> EngineClient:
    return EngineClient(pool_size=pool_size, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s)


def test_a_kept_alive_connection_carries_the_next_request(run: Any) -> None:
    async def main() -> None:
        async with Server(keep_answering) as server:
            engine = client()
            for body in (b'{"a": 1}', b'{"b": 22}'):
                answer = await engine.request(server.url, "POST", "/v1/x", [("X-Request-Id", "req_1")], body)
                assert answer.status == 200
                assert (await answer.read()).startswith(b'{"echo"')
                answer.release()
            assert server.connections == 1
            head, _, body = server.requests[1].partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            assert lines[0] == b"POST /v1/x HTTP/1.1"
            assert b"X-Request-Id: req_1" in lines and b"Content-Length: 9" in lines
            assert lines[1] == b"Host: " + server.url.removeprefix("http://").encode()
            assert body == b'{"b": 22}'
            await engine.close()

    run(main())


def test_chunked_answers_and_answers_framed_by_the_connections_end_are_read_whole(run: Any) -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"data: one\n\n", b"data: two\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await server.request(reader)  # kept alive: the next request comes on this connection

    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")

    async def main() -> None:
        engine = client()
        async with Server(chunked) as server:
            answer = await engine.request(server.url, "POST", "/s", [], b"{}")
            chunks = []
            while chunk := await answer.next_chunk():
                chunks.append(chunk)
            assert chunks == [b"data: one\n\n", b"data: two\n\n"]
            answer.release()
        async with Server(until_close) as server:
            answer = await engine.request(server.url, "GET", "/c", [])
            assert await answer.read() == b"all of it"
            answer.release()
        await engine.close()

    run(main())


def test_an_answer_cut_short_is_an_error_after_what_did_arrive(run: Any) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        await writer.drain()
        await asyncio.sleep(0.05)

    async def main() -> None:
        async with Server(cut) as server:
            engine = client()
            answer = await engine.request(server.url, "POST", "/x", [], b"{}")
            assert await answer.next_chunk() == b"only ten b"
            with pytest.raises(AnswerBroken):
                await answer.next_chunk()
            answer.release()
            answer = await engine.request(server.url, "POST", "/x", [], b"{}")
            with pytest.raises(AnswerBroken):
                await answer.read()
            answer.release()
            await engine.close()

    run(main())


def test_an_engine_that_is_not_listening_is_a_connect_failure(run: Any) -> None:
    async def main() -> None:
        async with Server(keep_answering) as server:
            url = server.url
        await asyncio.sleep(0.05)
        with pytest.raises(ConnectFailed):
            await client().request(url, "POST", "/x", [], b"{}")

    run(main())


def test_silence_past_the_read_timeout_is_a_timeout_before_and_after_the_head(run: Any) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        request = await server.request(reader)
        if request is not None and b"/head" in request:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhal")
            await writer.drain()
        await asyncio.sleep(3)

    async def main() -> None:
        async with Server(silent) as server:
            engine = client(read_timeout_s=0.3)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):
                await engine.request(server.url, "POST", "/nothing", [], b"{}")
            assert 0.25 < loop.time() - started < 1.5
            answer = await engine.request(server.url, "POST", "/head", [], b"{}")
            assert await answer.next_chunk() == b"hal"
            with pytest.raises(TimeoutError):
                await answer.next_chunk()
            answer.release()
            await engine.close()

    run(main())


def test_a_kept_alive_connection_the_engine_closed_is_replaced_once_and_a_new_one_is_not_retried(run: Any) -> None:
    async def closes_the_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        if await server.request(reader) is None:
            return
        if server.connections > 2:  # the retry's connection is closed without an answer too
            return
        writer.write(ok(b"{}"))
        await writer.drain()
        await server.request(reader)  # the reused connection's request: closed unanswered, as at an idle timeout

    async def main() -> None:
        async with Server(closes_the_second) as server:
            engine = client()
            answer = await engine.request(server.url, "POST", "/x", [], b"{}")
            await answer.read()
            answer.release()
            answer = await engine.request(server.url, "POST", "/x", [], b"{}")  # reused, closed, sent again
            assert answer.status == 200 and await answer.read() == b"{}"
            answer.release()
            assert server.connections == 2
            await engine.close()
            engine = client()
            with pytest.raises(AnswerBroken):  # a new connection closed unanswered: not sent twice
                await engine.request(server.url, "POST", "/x", [], b"{}")
            assert server.connections == 3
            await engine.close()

    run(main())


def test_releasing_an_unfinished_answer_closes_its_connection_and_wakes_its_reader(run: Any) -> None:
    async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        if await reader.read(1) == b"":
            server.closed_by_client.set()

    async def main() -> None:
        async with Server(streams) as server:
            engine = client(pool_size=1)
            answer = await engine.request(server.url, "POST", "/x", [], b"{}")
            assert await answer.next_chunk() == b"first"
            reading = asyncio.ensure_future(answer.next_chunk())
            await asyncio.sleep(0.05)
            answer.release()
            with pytest.raises(AnswerBroken):
                await asyncio.wait_for(reading, 2)
            await asyncio.wait_for(server.closed_by_client.wait(), 2)  # the engine sees its client leave
            answer = await asyncio.wait_for(engine.request(server.url, "POST", "/x", [], b"{}"), 2)  # slot is free
            answer.release()
            await engine.close()

    run(main())


def test_a_request_cancelled_before_its_answer_closes_the_connection_and_frees_its_slot(run: Any) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.request(reader)
        if await reader.read(1) == b"":
            server.closed_by_client.set()

    async def main() -> None:
        async with Server(slow) as server:
            engine = client(pool_size=1)
            waiting = asyncio.ensure_future(engine.request(server.url, "POST", "/x", [], b"{}"))
            await asyncio.sleep(0.1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await asyncio.wait_for(server.closed_by_client.wait(), 2)
            server.closed_by_client.clear()
            second = asyncio.ensure_future(engine.request(server.url, "POST", "/x", [], b"{}"))
            await asyncio.sleep(0.1)
            assert server.connections == 2  # the one slot was given back
            second.cancel()
            await engine.close()

    run(main())


def test_no_more_connections_than_the_pool_allows_and_waiting_requests_get_their_turn(run: Any) -> None:
    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while await server.request(reader) is not None:
            await asyncio.sleep(0.1)
            writer.write(ok(b"{}"))
            await writer.drain()

    async def main() -> None:
        async with Server(held) as server:
            engine = client(pool_size=2)

            async def one() -> bytes:
                answer = await engine.request(server.url, "POST", "/x", [], b"{}")
                try:
                    return await answer.read()
                finally:
                    answer.release()

            assert await asyncio.gather(*(one() for _ in range(6))) == [b"{}"] * 6
            assert server.most_open == 2 and server.connections == 2
            await engine.close()

    run(main())


def test_an_engine_faster_than_its_reader_is_held_back_not_buffered(run: Any) -> None:
    size = 64 * 1024 * 1024

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * (1024 * 1024)
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
            server.written += len(block)

    async def main() -> None:
        async with Server(flood) as server:
            engine = client()
            answer = await engine.request(server.url, "POST", "/x", [], b"{}")
            await asyncio.sleep(0.5)
            assert server.written < size // 4  # held back by the client that reads nothing
            total = 0
            while chunk := await answer.next_chunk():
                total += len(chunk)
            assert total == size
            answer.release()
            await engine.close()

    run(main())


def test_an_idle_connection_past_its_time_is_not_reused(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpclient, "IDLE_S", 0.05)

    async def main() -> None:
        async with Server(keep_answering) as server:
            engine = client()
            for _ in range(2):
                answer = await engine.request(server.url, "GET", "/health", [])
                await answer.read()
                answer.release()
                await asyncio.sleep(0.1)
            assert server.connections == 2
            await engine.close()

    run(main())


@pytest.mark.parametrize(
    ("path", "headers"),
    [("/x\r\nX-Evil: 1", []), ("/x y", []), ("/x", [("X-Request-Id", "a\r\nX-Evil: 1")]), ("/x", [("X-A\n", "b")])],
)
def test_a_header_or_path_that_would_split_the_request_is_refused_before_anything_is_sent(
    run: Any, path: str, headers: list[tuple[str, str]]
) -> None:
    async def main() -> None:
        async with Server(keep_answering) as server:
            with pytest.raises(ValueError, match="control character"):
                await client().request(server.url, "POST", path, headers, b"{}")
            await asyncio.sleep(0.05)
            assert server.connections == 0

    run(main())


def test_an_answer_that_is_not_http_is_broken(run: Any) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def main() -> None:
        async with Server(garbage) as server:
            with pytest.raises(AnswerBroken, match="not HTTP"):
                await client().request(server.url, "POST", "/x", [], b"{}")

    run(main())


def test_an_answer_whose_end_came_while_held_back_leaves_its_connection_readable(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its end arrived in the read that passed the high water mark, and nobody read it: the connection is kept, and
    the next request's answer on it is read (it was left paused once: the next answer waited for the read timeout)."""
    monkeypatch.setattr(httpclient, "HIGH_WATER", 10)

    async def main() -> None:
        async with Server(keep_answering) as server:
            engine = client(read_timeout_s=2.0)
            answer = await engine.request(server.url, "POST", "/x", [], b"{}" + b" " * 100)
            await asyncio.sleep(0.1)
            answer.release()  # unread
            answer = await asyncio.wait_for(engine.request(server.url, "POST", "/x", [], b"{}"), 1.0)
            assert await asyncio.wait_for(answer.read(), 1.0) == b'{"echo": %d}' % len(server.requests[-1])
            answer.release()
            assert server.connections == 1
            await engine.close()

    run(main())


def test_a_full_pool_refuses_after_the_connect_timeout_and_health_checks_do_not_wait_for_it(run: Any) -> None:
    async def main() -> None:
        async with Server(keep_answering) as server:
            engine = client(pool_size=1, connect_timeout_s=0.3)
            held = await engine.request(server.url, "POST", "/x", [], b"{}")
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(PoolBusy):
                await engine.request(server.url, "POST", "/x", [], b"{}")
            assert 0.25 < loop.time() - started < 1.5
            health = await asyncio.wait_for(engine.request(server.url, "GET", "/health", [], pooled=False), 1.0)
            assert health.status == 200
            health.release()
            held.release()
            answer = await asyncio.wait_for(engine.request(server.url, "POST", "/x", [], b"{}"), 1.0)  # a slot again
            answer.release()
            await engine.close()

    run(main())


def test_a_second_answer_to_one_request_retires_the_connection(run: Any) -> None:
    async def twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        while await server.request(reader) is not None:
            writer.write(ok(b'{"n": 1}') + ok(b'{"n": 2}'))
            await writer.drain()

    async def main() -> None:
        async with Server(twice) as server:
            engine = client()
            for _ in range(2):
                answer = await engine.request(server.url, "POST", "/x", [], b"{}")
                assert await answer.read() == b'{"n": 1}'  # never the stray second one
                answer.release()
            assert server.connections == 2
            await engine.close()

    run(main())


def test_a_reused_connection_that_dies_well_after_the_request_went_out_is_not_sent_again(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retried only when the connection was closing already; not after the engine had time to work on it."""
    monkeypatch.setattr(httpclient, "RETRY_WITHIN_S", 0.1)

    async def dies_later(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server) -> None:
        await server.request(reader)
        writer.write(ok(b"{}"))
        await writer.drain()
        await server.request(reader)
        await asyncio.sleep(0.3)  # worked on it, then died

    async def main() -> None:
        async with Server(dies_later) as server:
            engine = client()
            answer = await engine.request(server.url, "POST", "/x", [], b"{}")
            await answer.read()
            answer.release()
            with pytest.raises(AnswerBroken):
                await engine.request(server.url, "POST", "/x", [], b"{}")
            assert server.connections == 1
            await engine.close()

    run(main())


def test_every_address_of_an_engine_name_is_tried() -> None:
    """A name that resolves to an address nobody listens on first (``::1`` for ``localhost`` where the engine
    listens on 127.0.0.1) still reaches the engine at its next address. Named fake: the resolver's answer."""

    async def main() -> None:
        async with Server(keep_answering) as server:
            port = int(server.url.rsplit(":", 1)[1])
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                closed = probe.getsockname()[1]  # bound, not listening: refuses
                loop = asyncio.get_running_loop()

                async def resolve(host: str, _port: int, **_: Any) -> list[Any]:
                    assert host == "engine.internal"
                    stream = socket.SOCK_STREAM
                    return [
                        (socket.AF_INET, stream, 6, "", ("127.0.0.1", closed)),
                        (socket.AF_INET, stream, 6, "", ("127.0.0.1", port)),
                    ]

                loop.getaddrinfo = resolve  # type: ignore[method-assign]
                engine = client()
                answer = await engine.request(f"http://engine.internal:{port}", "GET", "/health", [])
                assert answer.status == 200
                answer.release()
                await engine.close()
            assert b"Host: engine.internal:%d" % port in server.requests[0]

    asyncio.run(main())
