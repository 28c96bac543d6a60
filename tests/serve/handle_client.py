"""A second Serve application that calls diffusion-serve through Python DeploymentHandles, the
way another team's Ray app would."""

from __future__ import annotations

from typing import Any

from ray import serve

from shared.api.schemas import GenerateRequest, GenerateResponse, StepEvent


@serve.deployment(name="HandleClient", ray_actor_options={"num_cpus": 0.05})
class HandleClient:
    def __init__(self, app_name: str) -> None:
        self._app_name = app_name

    async def unary(self, body: dict[str, Any]) -> dict[str, Any]:
        handle = serve.get_app_handle(self._app_name)
        response = await handle.generate.remote(GenerateRequest(**body))
        assert isinstance(response, GenerateResponse)
        return response.model_dump()

    async def streamed(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        handle = serve.get_app_handle(self._app_name).options(stream=True)
        events = []
        async for event in handle.stream.remote(GenerateRequest(**body)):
            assert isinstance(event, StepEvent) or event.event in ("queued", "result", "error")
            events.append(event.model_dump())
        return events

    async def failing(self, body: dict[str, Any]) -> dict[str, Any]:
        """What a handle caller sees for a bad request: our error type, status and code."""
        from shared.errors import InvalidRequestError, ServeError

        try:
            await serve.get_app_handle(self._app_name).generate.remote(body)
        except ServeError as exc:
            # Ray raises RayTaskError(InvalidRequestError): an instance of our class, fields intact.
            invalid = isinstance(exc, InvalidRequestError)
            return {**exc.to_dict(), "invalid_request": invalid, "status": exc.status}
        return {}
