"""fedtune: privacy package."""
