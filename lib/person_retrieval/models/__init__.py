"""Encoders (the open_clip backbone, positional stretching) and each paper's heads."""
from .backbone import (
    MINI_CONFIGS, Backbone, MiniClipConfig, build_backbone, load_real_clip, mini_clip, stretch_positional_embedding,
    stretch_text_encoder, weights_dir,
)

__all__ = ["MINI_CONFIGS", "Backbone", "MiniClipConfig", "build_backbone", "load_real_clip", "mini_clip",
           "stretch_positional_embedding", "stretch_text_encoder", "weights_dir"]
