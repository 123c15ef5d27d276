"""peftkit.experts."""
