"""Training: state, steps, loop, optimizer, data, metrics."""

from train.loop import train
from train.validate import validate_config
