"""fedtune: client package."""
