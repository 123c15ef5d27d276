"""peftkit.cli."""
