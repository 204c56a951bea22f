"""Flax NNX transformer modules. Logical axis names only; no mesh, no flags."""

from model.config import BLOCKS, REMAT, ModelConfig, MoEConfig, validate
from model.decoder import Decoder
from model.params import logical_axes
