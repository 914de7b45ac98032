"""A unit of parameters used together: the model groups its parameters into units (embedding,
each layer, the output layer) and ZeRO-3 gathers and frees a unit at once
(distributed/param_sharding.py). On the ground floor, so the sharding needs nothing of the model."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class ParamUnit:
    """Parameters used together, from `enter`'s forward start to `exit`'s forward end (what
    ZeRO-3 gathers at once, distributed/param_sharding.py)."""
    name: str
    params: list[nn.Parameter]
    enter: nn.Module
    exit: nn.Module
    backward_reads: bool = True  # its backward needs the parameters (gather them again for it)
