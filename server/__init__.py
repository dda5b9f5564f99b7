"""fedtune: server package."""
