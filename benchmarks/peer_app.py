"""A peer app in the shape of Ray Serve's documented Stable Diffusion example: a FastAPI ingress
whose `GET /imagine` calls one deployment that runs a whole diffusers `pipe(...)` per request
and answers a PNG. `benchmarks/throughput.py` measures it against our app in the same run."""

import io

from fastapi import FastAPI
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

peer = FastAPI()


@serve.deployment(num_replicas=1)
@serve.ingress(peer)
class APIIngress:
    def __init__(self, diffusion_model_handle: DeploymentHandle) -> None:
        self.handle = diffusion_model_handle

    @peer.get("/imagine", response_class=Response)
    async def generate(self, prompt: str, img_size: int = 64, steps: int = 8) -> Response:
        image = await self.handle.generate.remote(prompt, img_size=img_size, steps=steps)
        file_stream = io.BytesIO()
        image.save(file_stream, "PNG")
        return Response(content=file_stream.getvalue(), media_type="image/png")


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class StableDiffusionXL:
    def __init__(self, model_dir: str) -> None:
        from diffusers import StableDiffusionXLPipeline

        self.pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
        self.pipe.set_progress_bar_config(disable=True)

    def generate(self, prompt: str, img_size: int = 64, steps: int = 8):
        return self.pipe(prompt, height=img_size, width=img_size, num_inference_steps=steps).images[
            0
        ]


def build_peer(model_dir: str, max_ongoing_requests: int | None) -> serve.Application:
    """`max_ongoing_requests=None` keeps Serve's default, as the documented example does."""
    options = {} if max_ongoing_requests is None else {"max_ongoing_requests": max_ongoing_requests}
    return APIIngress.bind(StableDiffusionXL.options(**options).bind(model_dir))
