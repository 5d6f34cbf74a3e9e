"""A fast in-process OpenAI-shaped engine (aiohttp).

Used where the real vLLM engine cannot be made to fail on purpose (a 5xx, invalid JSON, a stream cut
off mid-way) and by the gateway-overhead benchmark as an upstream that costs next to nothing. It is a
**fake**: nothing here checks the gateway against vLLM's behaviour; the integration tests do that.

The first message's content (or the prompt) picks a behaviour: ``fail:500``, ``fail:400``,
``fail:badjson``, ``fail:truncate``, ``hang`` (a non-streamed answer that takes ``HANG_S`` seconds, given up
as soon as the gateway closes the connection, as vLLM aborts a request then); anything else gets a normal
answer of ``TOKENS`` tokens.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

TOKENS = 4
PROMPT_TOKENS = 5


def _usage(completion: int, prompt: int = PROMPT_TOKENS) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _behaviour(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return str(messages[0].get("content", ""))
    prompt = body.get("prompt", "")
    return str(prompt[0] if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else prompt)


def _prompts(body: dict[str, Any]) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def _generated(body: dict[str, Any]) -> int:
    """Tokens per choice: ``TOKENS``, or the cap when smaller; ``ignore_eos`` generates the whole cap (as vLLM)."""
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    return int(cap) if body.get("ignore_eos") else min(int(cap), TOKENS)


COMPLETIONS_SERVED: list[dict[str, Any]] = []  # every completion request received (tests read it)
TRACEPARENTS_SERVED: list[str | None] = []  # ... and the traceparent header each carried
HANG_S = 10.0
HANGING: list[str] = []  # request ids of `hang` requests received
ABANDONED: list[str] = []  # ... whose connection the gateway closed before the answer


async def _hang(request: web.Request) -> web.Response:
    request_id = request.headers.get("X-Request-Id", "")
    HANGING.append(request_id)
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        if request.transport is None or request.transport.is_closing():
            ABANDONED.append(request_id)
            return web.Response(status=499)
        await asyncio.sleep(0.01)
    return web.json_response({"error": {"message": "hung for nobody", "type": "InternalServerError"}}, status=500)


STREAMED_BYTES = [0]  # SSE bytes every stream has written so far (tests of back-pressure read it)
RUNNING = [0]  # requests being answered now, exposed as vllm:num_requests_running on /metrics


async def _completion(request: web.Request) -> web.StreamResponse:
    RUNNING[0] += 1
    try:
        return await _answer(request)
    finally:
        RUNNING[0] -= 1


async def _metrics(_request: web.Request) -> web.Response:
    return web.Response(text=f'vllm:num_requests_running{{model_name="fake"}} {float(RUNNING[0])}\n')


async def _answer(request: web.Request) -> web.StreamResponse:
    """Like vLLM: ``n`` choices for each prompt of a list; when streamed with continuous usage, each chunk
    carries its own choice's usage (that choice's tokens so far, its prompt's tokens)."""
    body = await request.json()
    COMPLETIONS_SERVED.append(body)
    TRACEPARENTS_SERVED.append(request.headers.get("traceparent"))
    behaviour = _behaviour(body)
    if behaviour == "fail:500":
        return web.json_response({"error": {"message": "engine exploded", "type": "InternalServerError"}}, status=500)
    if behaviour == "fail:400":
        return web.json_response(
            {"error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": "max_tokens"}},
            status=400,
        )
    if behaviour == "fail:badjson":
        return web.Response(body=b"{not json", content_type="application/json")
    if behaviour == "hang" and not body.get("stream"):
        return await _hang(request)
    chat = request.path.endswith("/chat/completions")
    prompts, n, tokens = _prompts(body), int(body.get("n") or 1), _generated(body)
    choices = prompts * n
    total = _usage(tokens * choices, PROMPT_TOKENS * prompts)
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    finished = "length" if tokens >= int(cap) else "stop"  # as vLLM says why each choice ended
    if not body.get("stream"):
        answers = []
        for index in range(choices):
            choice: dict[str, Any] = {"index": index, "finish_reason": finished}
            if chat:
                choice["message"] = {"role": "assistant", "content": "ok " * tokens}
            else:
                choice["text"] = "ok " * tokens
            answers.append(choice)
        return web.json_response(
            {
                "id": "cmpl-fake",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": answers,
                "usage": total,
            }
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for step in range(tokens):
        if behaviour == "fail:truncate" and step == 2:
            return response  # the connection ends without [DONE]
        if behaviour == "slow":
            await asyncio.sleep(0.05)
        for index in range(choices):
            delta = {"delta": {"content": "ok "}} if chat else {"text": "ok "}
            chunk = {
                "id": "cmpl-fake",
                "object": "chat.completion.chunk",
                "model": body.get("model"),
                "choices": [{"index": index, **delta, "finish_reason": finished if step == tokens - 1 else None}],
                "usage": _usage(step + 1),
            }
            event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
            await response.write(event)  # waits while the reader (the gateway) does not take what was written
            STREAMED_BYTES[0] += len(event)
    final = {"id": "cmpl-fake", "object": "chat.completion.chunk", "choices": [], "usage": total}
    await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    return response


TOKENIZE_SERVED: list[dict[str, Any]] = []  # every /tokenize request received


async def _tokenize(request: web.Request) -> web.Response:
    """A stand-in tokenizer: one token per word, plus 3 per chat message for its template and 10 per tool; or,
    for a fake given a model's folder, that model's tokenizer and chat template, as vLLM counts with them."""
    body = await request.json()
    TOKENIZE_SERVED.append(body)
    counter = request.app.get(_MODEL_COUNTER)
    if counter is not None:
        count = counter(body)
    elif isinstance(body.get("messages"), list):
        count = sum(len(str(m.get("content", "")).split()) + 3 for m in body["messages"])
        count += 10 * len(body.get("tools") or [])
    else:
        count = len(str(body.get("prompt", "")).split())
    return web.json_response({"count": count, "tokens": list(range(count)), "max_model_len": 8192})


_MODEL_COUNTER = web.AppKey("model_counter", object)


def model_counter(folder: Path) -> Any:
    """Counts a /tokenize body with the model's own files: its chat template rendered (with the appliance's
    renderer, which the appliance's tests check against vLLM) and its tokenizer, no special tokens added to a
    chat, as vLLM does."""
    from tokenizers import Tokenizer

    from appliance.gateway.templates import ChatTemplate

    template, tokenizer = ChatTemplate.load(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert template is not None, f"no chat template in {folder}"

    def count(body: dict[str, Any]) -> int:
        if isinstance(body.get("messages"), list):
            messages = [dict(m, content=_text_of(m.get("content"))) for m in body["messages"]]
            text = template.render(messages, bool(body.get("add_generation_prompt", True)))
            return len(tokenizer.encode(text, add_special_tokens=False).ids)
        special = body.get("add_special_tokens", True) is not False
        return len(tokenizer.encode(str(body.get("prompt", "")), add_special_tokens=special).ids)

    return count


def _text_of(content: Any) -> Any:
    """A message's content as vLLM gives it to a text template: text parts joined by newlines."""
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return content


EMBEDDING_DIMENSIONS = 384  # as the bundled embedding model's
EMBEDDINGS_SERVED: list[dict[str, Any]] = []  # every embeddings request received
# While set, embeddings whose first input starts with ``hold:`` are not answered (a busy engine, made on purpose
# so that a test holds ingestions in flight); ``EMBEDDINGS_HOLDING`` counts those waiting.
EMBEDDINGS_HELD = threading.Event()
EMBEDDINGS_HOLDING = [0]


async def _embeddings(request: web.Request) -> web.Response:
    """Deterministic unit vectors (from each input's hash): the same text always gets the same vector."""
    body = await request.json()
    EMBEDDINGS_SERVED.append(body)
    inputs = body.get("input")
    texts = inputs if isinstance(inputs, list) else [inputs]
    if texts and str(texts[0]).startswith("hold:"):
        EMBEDDINGS_HOLDING[0] += 1
        try:
            while EMBEDDINGS_HELD.is_set():
                await asyncio.sleep(0.01)
        finally:
            EMBEDDINGS_HOLDING[0] -= 1
    data = []
    for index, text in enumerate(texts):
        seed = int.from_bytes(hashlib.sha256(str(text).encode()).digest()[:8], "big")
        raw = [((seed >> (i % 60)) & 0xFF) - 127.5 + i % 7 for i in range(EMBEDDING_DIMENSIONS)]
        norm = math.sqrt(sum(x * x for x in raw)) or 1.0
        vector = [x / norm for x in raw]
        if body.get("encoding_format") == "base64":  # little-endian float32, as vLLM and OpenAI answer
            packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": packed})
        else:
            data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(len(str(text).split()) for text in texts)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return web.json_response({"object": "list", "data": data, "model": body.get("model"), "usage": usage})


async def _health(_request: web.Request) -> web.Response:
    return web.Response(text="")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeEngine:
    """Runs in a thread of its own, with its own event loop, so that a caller that blocks its loop (a
    test client, a benchmark) cannot stall it."""

    def __init__(self, port: int | None = None, metrics: bool = False, model_folder: Path | None = None) -> None:
        self.port = port or free_port()
        self.metrics = metrics  # serve /metrics (requests in flight), which the default fake does not
        self.model_folder = model_folder  # count /tokenize with this model's files, not by words
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        started = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._serve())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-engine", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the fake engine did not start")

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", _completion)
        app.router.add_post("/v1/completions", _completion)
        app.router.add_post("/v1/embeddings", _embeddings)
        app.router.add_get("/health", _health)
        if self.metrics:
            app.router.add_get("/metrics", _metrics)
        app.router.add_post("/tokenize", _tokenize)
        if self.model_folder is not None:
            app[_MODEL_COUNTER] = model_counter(self.model_folder)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


def serve_forever(port: int, metrics: bool = False, model_folder: str | None = None) -> None:
    """Run a fake engine in this process until it is killed (the benchmark runs it in its own process, the
    registry's tests as an engine kind of their own)."""
    FakeEngine(port, metrics, Path(model_folder) if model_folder else None).start()
    threading.Event().wait()
