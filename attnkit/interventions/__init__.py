"""The methods: one file each, a config dataclass plus what it does at each hook point."""

from attnkit.interventions.base import REGISTRY, Intervention, available, build, param, register
from attnkit.interventions.record import Record

__all__ = ["REGISTRY", "Intervention", "Record", "available", "build", "param", "register"]
