"""The methods: one file each, a config dataclass plus what it does at each hook point."""

from attnkit.interventions.base import REGISTRY, Intervention, available, build, param, register
from attnkit.interventions.cls_prune import ClsPrune
from attnkit.interventions.fastv import FastV
from attnkit.interventions.mma import MMA
from attnkit.interventions.pai import PAI
from attnkit.interventions.record import Record
from attnkit.interventions.sinks import find_sink_dims
from attnkit.interventions.var import VAR
from attnkit.interventions.vcd import VCD
from attnkit.interventions.vhr import VHR
from attnkit.interventions.vte import VisualTokenExit

__all__ = ["ClsPrune", "FastV", "Intervention", "MMA", "PAI", "REGISTRY", "Record", "VAR", "VCD", "VHR",
           "VisualTokenExit", "available", "build", "find_sink_dims", "param", "register"]
