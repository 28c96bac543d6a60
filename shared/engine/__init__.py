"""Everything that imports torch or diffusers: modules built from object-store weights, prompt
encoding, the SDXL denoising engine and its previews. Only model-owning deployments import it."""
