"""tunesmith server: OpenAI's fine-tuning API on your own machines."""
