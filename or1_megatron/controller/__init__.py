"""The OR1 training loop: placement on Ray, rollouts, the MAGIC update, checkpoints and metrics."""
