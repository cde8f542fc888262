"""Evaluation: metrics, thresholds, confidence intervals and calibration (`metrics`), the
shortcut check (`shortcuts`), and the `evaluate` and `calibrate` commands."""
