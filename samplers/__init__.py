"""ttscale.samplers: strategies that call an engine (repeated sampling, adaptive, SMC)."""

from ttscale.samplers.repeated import RepeatedSampler, SamplingSummary

__all__ = ["RepeatedSampler", "SamplingSummary"]
