"""Serving trained models: loading now; KV-cache generation is a later issue."""

from infer.load import load
