"""ttscale.evals."""
