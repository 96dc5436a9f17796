"""ttscale.samplers: strategies that call an engine (repeated sampling, adaptive, SMC)."""

from ttscale.samplers.base import Candidate, Fate, Sampler, SampleResult, StepInfo
from ttscale.samplers.pruning import PruningSampler, replay_pruning
from ttscale.samplers.repeated import RepeatedSampler, SamplingSummary
from ttscale.samplers.session import SamplingSession

__all__ = [
    "Candidate",
    "Fate",
    "PruningSampler",
    "RepeatedSampler",
    "SampleResult",
    "Sampler",
    "SamplingSession",
    "SamplingSummary",
    "StepInfo",
    "replay_pruning",
]
