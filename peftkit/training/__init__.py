"""peftkit.training."""
