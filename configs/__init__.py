"""Experiment configs: `get_config(variant)` in each file; shared pieces in common.py."""
