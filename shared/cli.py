"""`diffusion-serve`: the command-line client. It streams a generation's events and shows them
as they come (queue position, then a progress bar per step, previews saved as they arrive), and
turns every failure into one line and an exit code:

0 done · 1 not ready · 2 the server refused the request (4xx) · 3 it failed (5xx or an `error`
event) · 4 it could not be reached.

    diffusion-serve generate "a lighthouse at dusk" --size 64x64 --steps 8 --out lighthouse.png
    diffusion-serve edit lighthouse.png "a lighthouse in a storm" --mask sky.png --out storm.png
    diffusion-serve models
    diffusion-serve health
"""

import base64
import json
import mimetypes
import re
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
console = Console(stderr=True)
SIZE = re.compile(r"^(\d+)x(\d+)$")
EXIT_REFUSED, EXIT_FAILED, EXIT_UNREACHABLE = 2, 3, 4

Url = Annotated[str, typer.Option(envvar="DIFFUSION_SERVE_URL", help="The server's base URL.")]
ApiKey = Annotated[
    str | None,
    typer.Option(envvar="DIFFUSION_SERVE_API_KEY", help="Bearer key, if the server wants one."),
]


def _client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600)


def _fail(code: int, message: str) -> NoReturn:
    # soft_wrap: one line however long the message, so scripts can grep it.
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _refused(response: httpx.Response) -> NoReturn:
    try:
        error = response.json()["error"]
        message = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}"
    _fail(EXIT_REFUSED if response.status_code < 500 else EXIT_FAILED, message)


def _size(size: str | None) -> dict[str, int]:
    if size is None:
        return {}
    match = SIZE.match(size)
    if match is None:
        _fail(EXIT_REFUSED, f"--size must look like 1024x1024; got {size!r}")
    return {"width": int(match.group(1)), "height": int(match.group(2))}


def _save_images(result: dict[str, Any], out: Path) -> list[Path]:
    images = result["images"]
    paths = [out]
    if len(images) > 1:
        paths = [out.with_stem(f"{out.stem}-{i}") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(image["b64"]))
    return paths


Model = Annotated[str, typer.Option(help="Model id (see `models`).")]
Steps = Annotated[int | None, typer.Option(help="Denoising steps.")]
Seed = Annotated[int | None, typer.Option(help="Seed of the first image.")]
Count = Annotated[int, typer.Option(help="Number of images.")]
NegativePrompt = Annotated[str | None, typer.Option(help="What to avoid.")]
Scheduler = Annotated[str | None, typer.Option(help="Sampler name.")]
Out = Annotated[Path, typer.Option(help="Where the image goes (-0, -1... for n > 1).")]
PreviewDir = Annotated[
    Path | None, typer.Option(help="Save each step's preview here as it arrives.")
]
DEFAULT_OUT = Path("out.png")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    model: Model = "tiny",
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT; the model's if unset.")] = None,
    steps: Steps = None,
    seed: Seed = None,
    n: Count = 1,
    negative_prompt: NegativePrompt = None,
    scheduler: Scheduler = None,
    refiner: Annotated[
        bool, typer.Option(help="Finish the schedule with the model's refiner.")
    ] = False,
    switch_at: Annotated[
        float | None,
        typer.Option(help="With --refiner: share of the schedule the base runs (model default)."),
    ] = None,
    controlnet: Annotated[
        str | None, typer.Option(help="A ControlNet id of the model (see capabilities).")
    ] = None,
    control_image: Annotated[
        Path | None, typer.Option(help="With --controlnet: its control map (or photo).")
    ] = None,
    canny: Annotated[
        bool, typer.Option(help="With --controlnet: take Canny edges of --control-image.")
    ] = False,
    control_scale: Annotated[
        float | None, typer.Option(help="With --controlnet: its weight (default 1.0).")
    ] = None,
    out: Out = DEFAULT_OUT,
    preview_dir: PreviewDir = None,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
) -> None:
    """Generate images, showing every step as it happens."""
    extras: dict[str, Any] = {}
    if refiner:
        extras["refiner"] = {} if switch_at is None else {"switch_at": switch_at}
    if controlnet is not None:
        if control_image is None:
            _fail(EXIT_REFUSED, "--controlnet needs --control-image")
        control: dict[str, Any] = {"id": controlnet, "image": _data_url(control_image)}
        if canny:
            control["preprocessor"] = "canny"
        if control_scale is not None:
            control["scale"] = control_scale
        extras["controlnet"] = [control]
    body = _body(model, prompt, n, size, steps, seed, negative_prompt, scheduler, **extras)
    _run_streamed(body, out, preview_dir, url, api_key)


@app.command()
def edit(
    image: Annotated[Path, typer.Argument(help="The image to change.")],
    prompt: Annotated[str, typer.Argument(help="What the result should show.")],
    mask: Annotated[
        Path | None,
        typer.Option(
            help="Inpainting mask of the image's size: white = repaint, black = keep. "
            "Without one the whole image is redrawn (img2img)."
        ),
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(
            help="How much is repainted, 0 < S <= 1: only int(steps * S) steps run. "
            "The server's default: 0.8 without a mask, 1.0 with one."
        ),
    ] = None,
    mask_blur: Annotated[
        float | None, typer.Option(help="Blur radius of the mask, in pixels (default 0).")
    ] = None,
    model: Model = "tiny",
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT; the image's if unset.")] = None,
    steps: Steps = None,
    seed: Seed = None,
    n: Count = 1,
    negative_prompt: NegativePrompt = None,
    scheduler: Scheduler = None,
    out: Out = DEFAULT_OUT,
    preview_dir: PreviewDir = None,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = None,
) -> None:
    """Repaint an image (inpainting with --mask, img2img without), showing every step."""
    images = {"init_image": _data_url(image)}
    if mask is not None:
        images["mask"] = _data_url(mask)
    edits = {"strength": strength, "mask_blur": mask_blur, **images}
    body = _body(model, prompt, n, size, steps, seed, negative_prompt, scheduler, **edits)
    _run_streamed(body, out, preview_dir, url, api_key)


def _data_url(path: Path) -> str:
    """The file as a `data:` URL. The server tells formats apart by their bytes, so the type is
    only a hint, and a file it refuses is its 4xx (`unsupported_image`, `invalid_image`)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        _fail(EXIT_REFUSED, f"cannot read {path}: {exc.strerror or exc}")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(raw).decode()}"


def _body(
    model: str,
    prompt: str,
    n: int,
    size: str | None,
    steps: int | None,
    seed: int | None,
    negative_prompt: str | None,
    scheduler: str | None,
    **image_fields: Any,
) -> dict[str, Any]:
    """A streamed `/v1/generate` request; a field left None takes the server's default."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "n": n, "stream": True, **_size(size)}
    optional = {"steps": steps, "seed": seed, "negative_prompt": negative_prompt}
    optional.update(scheduler=scheduler, **image_fields)
    body.update({name: value for name, value in optional.items() if value is not None})
    return body


def _run_streamed(
    body: dict[str, Any], out: Path, preview_dir: Path | None, url: str, api_key: str | None
) -> None:
    """Send the request, follow its stream, save its images and print one line about them."""
    if preview_dir is not None:
        body["preview"] = "latent"
        preview_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _client(url, api_key) as http, http.stream("POST", "/v1/generate", json=body) as reply:
            if reply.status_code != 200:
                reply.read()
                _refused(reply)
            result = _follow(reply, preview_dir)
    except httpx.TransportError as exc:
        _fail(EXIT_UNREACHABLE, f"cannot reach {url}: {exc}")
    paths = _save_images(result, out)
    timings = result["timings"]
    seeds = ", ".join(str(image["seed"]) for image in result["images"])
    typer.echo(
        f"{', '.join(map(str, paths))}  seed {seeds}  {timings['total_ms']:.0f} ms "
        f"(queue {timings['queue_ms']:.0f}, denoise {timings['denoise_ms']:.0f})"
    )


def _follow(reply: httpx.Response, preview_dir: Path | None) -> dict[str, Any]:
    """Show the stream's events; return the result event."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("waiting", total=None)
        for line in reply.iter_lines():
            if not line:
                continue
            event = json.loads(line)
            kind = event["event"]
            if kind == "queued":
                eta = event.get("eta_ms")
                wait = f", about {eta / 1000:.1f} s" if eta else ""
                progress.update(task, description=f"queued (position {event['position']}{wait})")
            elif kind == "step":
                progress.update(
                    task, description="denoising", total=event["total"], completed=event["index"]
                )
                if preview_dir is not None:
                    for i, preview in enumerate(event["previews"]):
                        name = f"step-{event['index']:04d}-{i}.{preview['format']}"
                        (preview_dir / name).write_bytes(base64.b64decode(preview["b64"]))
            elif kind == "result":
                return event
            elif kind == "error":
                error = event["error"]
                _fail(EXIT_FAILED, f"{error['code']}: {error['message']}")
    _fail(EXIT_FAILED, "the stream ended without a result")


@app.command()
def models(url: Url = "http://127.0.0.1:8000", api_key: ApiKey = None) -> None:
    """List the server's models and their state."""
    try:
        with _client(url, api_key) as http:
            reply = http.get("/v1/models")
    except httpx.TransportError as exc:
        _fail(EXIT_UNREACHABLE, f"cannot reach {url}: {exc}")
    if reply.status_code != 200:
        _refused(reply)
    table = Table("model", "backend", "state")
    for card in reply.json()["data"]:
        table.add_row(card["id"], card["backend"], str(card["state"].get("state", "")))
    Console().print(table)


@app.command()
def health(url: Url = "http://127.0.0.1:8000") -> None:
    """Exit 0 when the server is ready, 1 when it is not (and say why)."""
    try:
        with _client(url, None) as http:
            reply = http.get("/readyz")
    except httpx.TransportError as exc:
        _fail(EXIT_UNREACHABLE, f"cannot reach {url}: {exc}")
    report = reply.json()
    if report.get("ready"):
        typer.echo("ready")
        return
    waiting = {name: state for name, state in report.get("backends", {}).items() if state != "ok"}
    _fail(1, f"not ready: backends {waiting}, failed models {report.get('failed_models', [])}")


def main() -> None:
    app()
