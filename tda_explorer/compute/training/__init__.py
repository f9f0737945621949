"""Training and recording runs: the training loop with checkpoints, the run recorder (exact replay) and the step
recorder (per-step projected gradients), seeded dropout masks, low-rank adapters, safe checkpoint loading."""
