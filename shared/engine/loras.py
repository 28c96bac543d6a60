"""Per-request LoRAs as PEFT adapters in one engine's UNet, and the set each UNet call runs with.

A request names a LoRA set (`DenoiseJob.loras`: (id, scale) pairs). The step batcher groups
requests by that set, so each UNet call runs with exactly one: `activate` switches the UNet's
active adapters and their weights before the call (diffusers' `set_adapters`), or turns LoRA
layers off for a call without any. Adapters are injected the first time a set needs them, with
diffusers' own loaders (`StableDiffusionXLPipeline.lora_state_dict` converts kohya/A1111 keys,
`load_lora_adapter` builds the PEFT layers), so outputs equal diffusers' `load_lora_weights` +
`set_adapters`. At most `max_loaded` adapters stay in the UNet: the least recently used one that
no request in flight needs is deleted to make room.

Everything here runs on the batcher's thread, between UNet calls: injecting an adapter rewires
the UNet's modules, which must never happen under a running forward. Its weights are already in
this node's object store, so a load costs the injection only (`load_ms` records it).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel

from shared.api.jobs import LoraSet
from shared.errors import InvalidRequestError

MAX_LOADED = 8


class LoraAdapters:
    """The adapters of one UNet; `sources` maps a LoRA id to a loader of its state dict."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        sources: dict[str, Callable[[], dict[str, torch.Tensor]]],
        max_loaded: int = MAX_LOADED,
    ) -> None:
        self.unet = unet
        self.sources = sources
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, None] = OrderedDict()  # LRU order, oldest first
        self.load_ms: dict[str, float] = {}
        self._active: LoraSet | None = ()  # what the UNet runs with now; None = unknown

    @property
    def ids(self) -> list[str]:
        return sorted(self.sources)

    def check(self, loras: LoraSet) -> None:
        unknown = [lora_id for lora_id, _ in loras if lora_id not in self.sources]
        if unknown:
            known = ", ".join(self.ids) or "none"
            raise InvalidRequestError(
                f"unknown LoRA {unknown[0]!r} for this model; its LoRAs: {known}",
                code="unknown_lora",
                param="loras",
            )
        if len(loras) > self.max_loaded:
            raise InvalidRequestError(
                f"{len(loras)} LoRAs at once; this engine holds at most {self.max_loaded}",
                param="loras",
            )

    def ensure(self, loras: LoraSet) -> None:
        """Inject the set's adapters that are not loaded, evicting the least recently used
        others beyond the cap (a set evicted under another group's feet is reloaded at its next
        call: correct always, slower only when more LoRAs are in flight than the cap)."""
        self.check(loras)
        for lora_id, _ in loras:
            if lora_id in self.loaded:
                self.loaded.move_to_end(lora_id)
                continue
            self._evict(keep={i for i, _ in loras})
            started = time.perf_counter()
            # Imported here: the pipeline module pulls in every text model diffusers knows, some
            # tens of MB of private memory a replica that never loads a LoRA should not pay.
            from diffusers import StableDiffusionXLPipeline

            state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(
                self.sources[lora_id](), unet_config=self.unet.config
            )
            self.unet.load_lora_adapter(
                state_dict, prefix="unet", network_alphas=alphas, adapter_name=lora_id
            )
            self.load_ms[lora_id] = (time.perf_counter() - started) * 1000
            self.loaded[lora_id] = None
            self._active = None  # injecting activates the new adapter

    def activate(self, loras: LoraSet) -> None:
        """Make the next UNet call run with exactly `loras` (already `ensure`d)."""
        if loras == self._active:
            return
        if not loras:
            if self.loaded:
                self.unet.disable_lora()
        else:
            self.unet.enable_lora()
            names = [lora_id for lora_id, _ in loras]
            self.unet.set_adapters(names, weights=[scale for _, scale in loras])
        self._active = loras

    def _evict(self, keep: set[str]) -> None:
        while len(self.loaded) >= self.max_loaded:
            victim = next((i for i in self.loaded if i not in keep), None)
            if victim is None:
                return  # the set alone exceeds the cap: `check` refuses such sets
            self.unet.delete_adapters(victim)
            del self.loaded[victim]
            self._active = None
