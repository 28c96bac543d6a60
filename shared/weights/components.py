"""The picklable containers a model's weights travel in: `ComponentWeights` per pipeline
component, `ModelWeights` per model. The loaders (`shared.weights.loader`, `shared.weights.loras`)
fill them; ModelCache `ray.put`s each component as is; replicas rebuild modules from them with
`shared.engine.modules`. Nothing here needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.weights.tensor_files import TensorBlob


@dataclass(repr=False)
class ComponentWeights:
    """Everything needed to rebuild one pipeline component, and nothing that needs torch.

    `files_sha256` holds the sha256 of every file read for the component, keyed by its path as
    the model's `sha256:` setting names it (relative to the model source; `taesd/…`, `vae/…`,
    `ip_adapter/…` or `lora:<id>/…` for files of another source), so a load can be pinned by
    pasting them there.
    """

    name: str
    library: str  # "diffusers" | "transformers" | "peft" (LoRAs)
    class_name: str
    config: dict[str, Any]
    tensors: dict[str, TensorBlob] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    files_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values()) + sum(map(len, self.files.values()))

    def __repr__(self) -> str:
        return (
            f"ComponentWeights({self.name}: {self.library}.{self.class_name}, "
            f"{len(self.tensors)} tensors, {len(self.files)} files, {self.nbytes} bytes)"
        )


@dataclass(repr=False)
class ModelWeights:
    source: str
    components: dict[str, ComponentWeights]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.components.values())

    @property
    def digests(self) -> dict[str, dict[str, str]]:
        """{component: {file: sha256}} of every file read for the model's components."""
        return {name: dict(c.files_sha256) for name, c in self.components.items()}

    def __repr__(self) -> str:
        return f"ModelWeights({self.source}: {', '.join(self.components)}; {self.nbytes} bytes)"
