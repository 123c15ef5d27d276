"""peftkit.data."""
