"""The base of every config model: unknown keys are refused, so a typo fails at deploy time."""

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
