"""ttscale.samplers: strategies that call an engine (repeated sampling, adaptive, SMC)."""

from ttscale.samplers.adaptive import AdaptiveSampler
from ttscale.samplers.base import Candidate, Fate, Sampler, SampleResult, StepInfo
from ttscale.samplers.potentials import (
    LikelihoodTempering,
    Potential,
    SumPotential,
    VerifierPotential,
    make_potential,
    register_potential,
)
from ttscale.samplers.pruning import PruningSampler, replay_pruning
from ttscale.samplers.repeated import RepeatedSampler, SamplingSummary
from ttscale.samplers.search import SearchSampler
from ttscale.samplers.session import SamplingSession
from ttscale.samplers.shortmk import ShortMKSampler
from ttscale.samplers.smc import SMCSampler, select_answer

__all__ = [
    "AdaptiveSampler",
    "Candidate",
    "Fate",
    "LikelihoodTempering",
    "Potential",
    "PruningSampler",
    "RepeatedSampler",
    "SMCSampler",
    "SampleResult",
    "Sampler",
    "SamplingSession",
    "SamplingSummary",
    "SearchSampler",
    "ShortMKSampler",
    "StepInfo",
    "SumPotential",
    "VerifierPotential",
    "make_potential",
    "register_potential",
    "select_answer",
    "replay_pruning",
]
