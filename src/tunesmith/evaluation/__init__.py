"""Evaluation: metrics over chat rows (`tunesmith eval`), A/B comparisons and drift checks."""
