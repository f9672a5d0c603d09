"""The `tunesmith` command: one module per command group."""
