"""fedtune: fedtune package."""
