"""Pooled async HTTP client for the vLLM engines (aiohttp: measured far cheaper than httpx here)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from appliance.lib.errors import (
    EngineUnavailableError,
    ModelNotFoundError,
    UpstreamError,
    UpstreamRequestError,
)
from appliance.settings import EngineRoute, GatewaySettings

_MAX_ENGINE_MESSAGE = 2000


@dataclass(frozen=True, slots=True)
class EngineHealth:
    model: str
    url: str
    healthy: bool
    error: str | None = None


class EngineRouter:
    """Knows which engine serves which model, and talks to it over one pooled session."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._routes: dict[str, EngineRoute] = {route.model: route for route in settings.routes}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=self._settings.pool_size, keepalive_timeout=30, ttl_dns_cache=None
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._settings.connect_timeout_s, sock_read=self._settings.read_timeout_s
            ),
            auto_decompress=False,
            json_serialize=lambda obj: msgspec.json.encode(obj).decode(),
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def routes(self) -> list[EngineRoute]:
        return list(self._routes.values())

    def route(self, model: str) -> EngineRoute:
        try:
            return self._routes[model]
        except KeyError:
            raise ModelNotFoundError(model) from None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise EngineUnavailableError("The gateway is not started.")
        return self._session

    async def open(self, route: EngineRoute, path: str, body: bytes, request_id: str) -> aiohttp.ClientResponse:
        """POST ``body`` to the engine; return the open response once its status is 200.

        The caller owns the response and must ``close()``/``release()`` it. Errors are mapped here.
        """
        try:
            response = await self.session.post(
                route.url + path,
                data=body,
                headers={"Content-Type": "application/json", "X-Request-Id": request_id},
            )
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise EngineUnavailableError(
                f"The engine serving `{route.model}` is unavailable.", code="engine_unavailable"
            ) from exc
        except TimeoutError as exc:
            raise EngineUnavailableError(
                f"The engine serving `{route.model}` did not answer in time.", code="engine_timeout"
            ) from exc
        if response.status != 200:
            try:
                raw = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                raw = b""
            finally:
                response.release()
            raise engine_error(route.model, response.status, raw)
        return response

    async def count_prompt_tokens(self, route: EngineRoute, data: dict[str, Any], request_id: str) -> int:
        """The prompt's token count from the engine's own tokenizer, chat template included (vLLM /tokenize):
        the same number the engine will report as prompt_tokens."""
        if isinstance(data.get("messages"), list):
            body = {"model": route.model, "messages": data["messages"], "add_generation_prompt": True}
        else:
            prompt = data.get("prompt", data.get("input", ""))
            if isinstance(prompt, list):  # a batch: tokens of every item
                counts = [await self.count_prompt_tokens(route, {"prompt": item}, request_id) for item in prompt]
                return sum(counts)
            body = {"model": route.model, "prompt": prompt if isinstance(prompt, str) else str(prompt)}
        response = await self.open(route, "/tokenize", msgspec.json.encode(body), request_id)
        try:
            return int(msgspec.json.decode(await response.read())["count"])
        finally:
            response.release()

    async def health(self, route: EngineRoute) -> EngineHealth:
        try:
            async with self.session.get(
                route.url + "/health", timeout=aiohttp.ClientTimeout(total=self._settings.health_timeout_s)
            ) as response:
                if response.status == 200:
                    return EngineHealth(route.model, route.url, True)
                return EngineHealth(route.model, route.url, False, f"health answered {response.status}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return EngineHealth(route.model, route.url, False, type(exc).__name__)

    async def health_all(self) -> list[EngineHealth]:
        return list(await asyncio.gather(*(self.health(route) for route in self._routes.values())))


class PromptCount:
    """A request's prompt tokens, asked of the engine's tokenizer once however many need them (budgets,
    admission tiers)."""

    def __init__(self, router: EngineRouter, route: EngineRoute, data: dict[str, Any], request_id: str) -> None:
        self._router, self._route, self._data, self._request_id = router, route, data, request_id
        self.value: int | None = None

    async def __call__(self) -> int:
        if self.value is None:
            self.value = await self._router.count_prompt_tokens(self._route, self._data, self._request_id)
        return self.value


def engine_error(model: str, status: int, raw: bytes) -> UpstreamError | UpstreamRequestError:
    """Map an engine's non-200 answer: its 4xx are the client's fault (passed on), the rest are 502."""
    message, param = _engine_message(raw)
    if 400 <= status < 500 and status not in (401, 403, 407, 408, 429):
        return UpstreamRequestError(status, message or f"The engine refused the request ({status}).", param=param)
    detail = f": {message}" if message else ""
    return UpstreamError(f"The engine serving `{model}` failed with status {status}{detail}")


def _engine_message(raw: bytes) -> tuple[str, str | None]:
    try:
        data: Any = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw[:_MAX_ENGINE_MESSAGE].decode("utf-8", "replace").strip(), None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            message = str(error.get("message") or "")[:_MAX_ENGINE_MESSAGE]
            param = error.get("param")
            return message, param if isinstance(param, str) else None
        if isinstance(error, str):
            return error[:_MAX_ENGINE_MESSAGE], None
    return "", None
