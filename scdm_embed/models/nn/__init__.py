"""Torch modules that several adapters share (no checkpoint mapping, no tokenizing).

- :mod:`.attention`: softmax multi-head self-attention and post-norm encoder layers
  (``nn.TransformerEncoderLayer`` layout), used by scGPT, UCE and scFoundation;
- :mod:`.performer`: the FAVOR+ Performer encoder, used by scBERT and CellLM.
"""

from __future__ import annotations

from .attention import Encoder, EncoderLayer, MultiheadSelfAttention, encoder_layers
from .performer import PerformerConfig, PerformerEncoder, PerformerSelfAttention

__all__ = ["Encoder", "EncoderLayer", "MultiheadSelfAttention", "PerformerConfig", "PerformerEncoder",
           "PerformerSelfAttention", "encoder_layers"]
