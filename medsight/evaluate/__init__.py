"""Metrics, calibration and thresholds for judging a model on labelled data."""
