"""ttscale.verifiers."""
