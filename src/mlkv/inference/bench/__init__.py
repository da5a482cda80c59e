"""inference/bench."""
