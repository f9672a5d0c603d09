"""Data: read, validate, tokenize, collate."""
