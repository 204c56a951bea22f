"""Training: state, steps, loop, optimizer, data, metrics."""

from train.checkpoint import CheckpointError
from train.loop import Diverged, train
from train.validate import validate_config
