"""Recipes: build the parts from a Config and call the training loop."""
