"""peftkit.evaluation."""
