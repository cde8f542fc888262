"""Hostile-input cases for ``benchmarks/hostile_inputs.py``, one module per area."""
