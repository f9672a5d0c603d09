"""The training loop, optimizer and schedule, checkpoints."""
