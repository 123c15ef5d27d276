"""peftkit.serving."""
