"""Training methods: which parameters train, and how (peft adapters, freezing, full)."""
