"""Export trained runs: merged Hugging Face folders, checked against the training-time model."""
