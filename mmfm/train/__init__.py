"""Training: the loop, loss, optimizer, checkpoints, metrics and progress."""
