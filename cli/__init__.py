"""ttscale.cli."""
