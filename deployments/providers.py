"""CloudProvider: one deployment per configured remote image API, wrapping its Ray-free client.

Retries, deadlines and the circuit breaker live in the client (`shared/providers/`); the
deployment gives each provider its own replicas, name and health in the Ray dashboard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve

from shared.api.schemas import GenerateRequest, ResultEvent, StepEvent
from shared.providers import ProviderConfigBase, build_client


@serve.deployment(name="CloudProvider")
class CloudProvider:
    def __init__(self, config: ProviderConfigBase) -> None:
        self._client = build_client(config)

    async def generate(
        self, request: GenerateRequest, request_id: str, deadline: float | None = None
    ) -> ResultEvent:
        return await self._client.generate(request, request_id, deadline)

    async def stream(
        self, request: GenerateRequest, request_id: str, deadline: float | None = None
    ) -> AsyncIterator[StepEvent | ResultEvent]:
        async for event in self._client.stream(request, request_id, deadline):
            yield event

    async def breaker_state(self) -> str:
        return self._client.breaker_state()

    async def ping(self) -> str:
        return "ok"
