"""OpenAI-compatible serving over the project's generation code."""
