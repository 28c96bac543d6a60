"""Fake Runware API on loopback: REST `POST /v1` with a JSON array of tasks, Bearer auth, and the
same task protocol over a WebSocket at `/v1` (what Runware's own SDK speaks).

Validates like the current API: a missing or wrong key (401 `missingApiKey` / `invalidApiKey`), a
body that is not a task array, unknown task types and parameters, taskUUID (a UUID v4), the model
(an AIR id this fake serves), prompt length, sizes (multiples of 64 in 128..2048), ranges (seeds
from 1) and enums, `deliveryMethod` (this fake answers `sync` tasks only) and the `safety` object.
The deprecated `checkNSFW` is refused, so a client that still sends it fails here rather than
when Runware drops it. Errors use Runware's `{"errors": [{code, message, parameter, taskType,
taskUUID}]}` shape. Answers `{"data": [{taskType, taskUUID, imageUUID, imageBase64Data |
imageDataURI | imageURL, seed, NSFWContent?, cost?}]}`; a `ping` task answers `pong`. Every
taskUUID seen is kept in `task_uuids` so tests can check that each attempt has its own.

Over the WebSocket the first task must be `authentication` with `apiKey` (answered with a
`connectionSessionUUID`); each message is a task array, answered with one message per task.

Faults (REST only): the generic ones, `content_filter` (the image comes back blacked out with
`NSFWContent: true`, as Runware does when `safety.checkContent` flags it) and `task_error` (a 200
whose `errors` array reports the task failed, with the code given in `text`).
"""

from __future__ import annotations

import base64
import random
import re
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from tests.fakes.images import MIME_TYPES, make_image
from tests.fakes.server import FakeProvider, Fault

INFERENCE_FIELDS = {
    "taskType",
    "taskUUID",
    "model",
    "positivePrompt",
    "negativePrompt",
    "width",
    "height",
    "steps",
    "CFGScale",
    "scheduler",
    "seed",
    "numberResults",
    "outputType",
    "outputFormat",
    "outputQuality",
    "deliveryMethod",
    "safety",
    "includeCost",
    "clipSkip",
    "lora",
}
FORMATS = {"PNG": "png", "JPG": "jpeg", "WEBP": "webp"}
OUTPUT_TYPES = {"base64Data", "dataURI", "URL"}
AIR = re.compile(r"^[a-z0-9_-]+:[0-9]+@[A-Za-z0-9_.-]+$")
RANGES = {"steps": (1, 100), "numberResults": (1, 20), "seed": (1, 2**63 - 1)}
SAFETY_FIELDS = {"tolerance": bool, "checkInputs": bool, "checkContent": bool, "mode": str}
DEPRECATED = {"checkNSFW": "checkNSFW is deprecated; use safety.checkContent."}


class _TaskError(Exception):
    def __init__(self, code: str, message: str, parameter: str | None) -> None:
        super().__init__(message)
        self.code = code
        self.parameter = parameter


class RunwareFake(FakeProvider):
    kind = "runware"
    default_models = ["runware:100@1", "civitai:133005@782002"]
    special_faults = {"content_filter", "task_error"}

    def __init__(self, **kwargs: Any) -> None:
        self.task_uuids: list[str] = []
        super().__init__(**kwargs)

    def routes(self) -> list[BaseRoute]:
        return [Route("/v1", self._tasks, methods=["POST"]), WebSocketRoute("/v1", self._socket)]

    def reset(self) -> None:
        super().reset()
        self.task_uuids.clear()

    def error_response(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        task: dict[str, Any] | None = None,
    ) -> Response:
        error: dict[str, Any] = {"code": code or _status_code_name(status), "message": message}
        if param is not None:
            error["parameter"] = param
        if task is not None:
            error |= {"taskType": task.get("taskType"), "taskUUID": task.get("taskUUID")}
        return JSONResponse({"errors": [error]}, status_code=status, headers=headers)

    # -- route ----------------------------------------------------------------------------------

    async def _tasks(self, request: Request) -> Response:
        call = await self.record(request)
        fault, early = await self.take_fault(request)
        if early is not None:
            return early
        denied = self._auth_failure(request)
        if denied is not None:
            return denied
        if not isinstance(call.body, list) or not call.body:
            return self.error_response(
                400, "The request body must be a non-empty JSON array of tasks.", code="invalidBody"
            )
        data = []
        for task in call.body:
            try:
                data.extend(self._run(task, fault))
            except _TaskError as exc:
                task_info = task if isinstance(task, dict) else None
                return self.error_response(
                    400, str(exc), code=exc.code, param=exc.parameter, task=task_info
                )
        if fault is not None and fault.kind == "task_error":
            return JSONResponse({"data": [], "errors": [_task_error(call.body[0], fault)]})
        return JSONResponse({"data": data})

    async def _socket(self, websocket: WebSocket) -> None:
        """The task protocol over a WebSocket: authenticate first, then one answer per task."""
        await websocket.accept()
        authenticated = False
        try:
            while True:
                raw = await websocket.receive_text()
                call = self.record_raw("WS", "/v1", dict(websocket.headers), raw.encode())
                tasks = call.body if isinstance(call.body, list) else [call.body]
                for task in tasks:
                    if not authenticated:
                        authenticated = await self._authenticate(websocket, task)
                        if not authenticated:
                            await websocket.close()
                            return
                        continue
                    await websocket.send_json(self._socket_answer(task))
        except WebSocketDisconnect:
            return

    async def _authenticate(self, websocket: WebSocket, task: Any) -> bool:
        authentication = isinstance(task, dict) and task.get("taskType") == "authentication"
        if authentication and task.get("apiKey") == self.api_key:
            session = {"taskType": "authentication", "connectionSessionUUID": str(uuid.uuid4())}
            await websocket.send_json({"data": [session]})
            return True
        error = {
            "code": "invalidApiKey",
            "message": "Invalid API key. Get one at https://my.runware.ai/signup",
            "parameter": "apiKey",
            "taskType": "authentication",
        }
        await websocket.send_json({"errors": [error]})
        return False

    def _socket_answer(self, task: Any) -> dict[str, Any]:
        try:
            return {"data": self._run(task, None)}
        except _TaskError as exc:
            error: dict[str, Any] = {"code": exc.code, "message": str(exc)}
            if exc.parameter is not None:
                error["parameter"] = exc.parameter
            if isinstance(task, dict):
                error |= {"taskType": task.get("taskType"), "taskUUID": task.get("taskUUID")}
            return {"errors": [error]}

    def _auth_failure(self, request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        if not header:
            return self.error_response(
                401,
                "Missing API key. Send it as 'Authorization: Bearer <key>'.",
                code="missingApiKey",
                param="apiKey",
            )
        if header.removeprefix("Bearer ").strip() != self.api_key:
            return self.error_response(
                401,
                "Invalid API key. Get one at https://my.runware.ai/signup",
                code="invalidApiKey",
                param="apiKey",
            )
        return None

    # -- tasks ----------------------------------------------------------------------------------

    def _run(self, task: Any, fault: Fault | None) -> list[dict[str, Any]]:
        if not isinstance(task, dict):
            raise _TaskError("invalidTask", "Each task must be a JSON object.", None)
        if task.get("taskType") == "ping":
            return [{"taskType": "ping", "pong": True}]
        if task.get("taskType") != "imageInference":
            raise _TaskError(
                "unsupportedTaskType", f"Unsupported taskType {task.get('taskType')!r}.", "taskType"
            )
        self._validate(task)
        self.task_uuids.append(task["taskUUID"])
        seed = task.get("seed", random.randrange(1, 2**31))
        flagged = fault is not None and fault.kind == "content_filter"
        return [self._result(task, seed + i, flagged) for i in range(task.get("numberResults", 1))]

    def _validate(self, task: dict[str, Any]) -> None:
        for name in task:
            if name in DEPRECATED:
                raise _TaskError("unsupportedParameter", DEPRECATED[name], name)
            if name not in INFERENCE_FIELDS:
                raise _TaskError("unsupportedParameter", f"Unknown parameter '{name}'.", name)
        _check_uuid4(task.get("taskUUID"))
        model = task.get("model")
        if not isinstance(model, str) or not AIR.match(model) or model not in self.models:
            raise _TaskError("invalidModel", f"Invalid model AIR identifier {model!r}.", "model")
        prompt = task.get("positivePrompt")
        if not isinstance(prompt, str) or not 3 <= len(prompt) <= 3000:
            raise _TaskError(
                "invalidPositivePrompt",
                "positivePrompt must be a string of 3 to 3000 characters.",
                "positivePrompt",
            )
        for side in ("width", "height"):
            value = task.get(side)
            if not isinstance(value, int) or value % 64 or not 128 <= value <= 2048:
                raise _TaskError(
                    f"invalid{side.title()}",
                    f"{side} must be a multiple of 64 between 128 and 2048; got {value!r}.",
                    side,
                )
        _check_ranges(task)
        _check_delivery_and_safety(task)

    def _result(self, task: dict[str, Any], seed: int, flagged: bool) -> dict[str, Any]:
        fmt = FORMATS[task.get("outputFormat", "JPG")]
        # Runware blacks out an image its NSFW check flags; seed 0 draws black here.
        data = make_image(task["width"], task["height"], fmt, 0 if flagged else seed)
        result: dict[str, Any] = {
            "taskType": "imageInference",
            "taskUUID": task["taskUUID"],
            "imageUUID": str(uuid.uuid4()),
            "seed": seed,
        }
        output_type = task.get("outputType", "URL")
        if output_type == "base64Data":
            result["imageBase64Data"] = base64.b64encode(data).decode("ascii")
        elif output_type == "dataURI":
            encoded = base64.b64encode(data).decode("ascii")
            result["imageDataURI"] = f"data:{MIME_TYPES[fmt]};base64,{encoded}"
        else:
            result["imageURL"] = self.store_file(data, MIME_TYPES[fmt], fmt)
        if task.get("safety", {}).get("checkContent"):
            result["NSFWContent"] = flagged
        if task.get("includeCost"):
            result["cost"] = 0.0013
        return result


def _task_error(task: dict[str, Any], fault: Fault) -> dict[str, Any]:
    """A task that failed on Runware's side although the request as a whole succeeded."""
    return {
        "code": fault.text or "inferenceError",
        "message": "The task failed while running.",
        "taskType": task.get("taskType"),
        "taskUUID": task.get("taskUUID"),
    }


def _check_uuid4(value: Any) -> None:
    try:
        parsed = uuid.UUID(str(value))
    except ValueError:
        parsed = None
    if parsed is None or parsed.version != 4:
        raise _TaskError("invalidTaskUUID", "taskUUID must be a UUID v4 string.", "taskUUID")


def _check_ranges(task: dict[str, Any]) -> None:
    for name, (low, high) in RANGES.items():
        value = task.get(name, low)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise _TaskError(f"invalid{name[0].upper()}{name[1:]}", f"Invalid {name}.", name)
    cfg = task.get("CFGScale", 7)
    if not isinstance(cfg, int | float) or not 0 <= cfg <= 50:
        raise _TaskError("invalidCFGScale", "CFGScale must be between 0 and 50.", "CFGScale")
    if task.get("outputType", "URL") not in OUTPUT_TYPES:
        raise _TaskError("invalidOutputType", "Invalid outputType.", "outputType")
    if task.get("outputFormat", "JPG") not in FORMATS:
        raise _TaskError("invalidOutputFormat", "Invalid outputFormat.", "outputFormat")


def _check_delivery_and_safety(task: dict[str, Any]) -> None:
    if task.get("deliveryMethod", "sync") != "sync":
        raise _TaskError(
            "invalidDeliveryMethod",
            "This fake answers deliveryMethod 'sync' only.",
            "deliveryMethod",
        )
    safety = task.get("safety", {})
    if not isinstance(safety, dict):
        raise _TaskError("invalidSafety", "safety must be an object.", "safety")
    for name, value in safety.items():
        kind = SAFETY_FIELDS.get(name)
        if kind is None or not isinstance(value, kind):
            raise _TaskError("invalidSafety", f"Invalid safety parameter '{name}'.", "safety")


def _status_code_name(status: int) -> str:
    names = {429: "rateLimitExceeded", 500: "internalServerError", 503: "serviceUnavailable"}
    return names.get(status, f"httpError{status}")
