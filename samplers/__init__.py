"""ttscale.samplers."""
