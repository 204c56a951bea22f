"""Experiment configs. Each module defines get_config(arg=None) -> ConfigDict."""
