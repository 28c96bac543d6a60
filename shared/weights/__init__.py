"""Model weights without torch: sources (folder, s3://, Hub), checkpoint parsing, the loader that
turns a source into picklable `ModelWeights`, the cache's state machine, and the built-in models."""
