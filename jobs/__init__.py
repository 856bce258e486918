"""Ray Train jobs that retrain OVSAM's two transfer stages, their evaluation, and the synthetic shapes data."""
