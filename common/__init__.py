"""fedtune: common package."""
