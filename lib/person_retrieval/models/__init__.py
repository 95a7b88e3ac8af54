"""Encoders shared by every paper: the open_clip backbone (positional stretching), the CLIP-style dual
encoder and its evaluation (:mod:`.retrieval`), and the mini CLIP's pretraining (:mod:`.pretrain`)."""
from .backbone import (
    MINI_CONFIGS, Backbone, MiniClipConfig, build_backbone, load_real_clip, mini_clip, stretch_positional_embedding,
    stretch_text_encoder, weights_dir,
)
from .pretrain import pretrained_image_tower, pretrained_mini_clip
from .retrieval import DualEncoder, encode, encode_images, evaluate_retrieval, fixed_temperature, split_data

__all__ = ["MINI_CONFIGS", "Backbone", "MiniClipConfig", "build_backbone", "load_real_clip", "mini_clip",
           "stretch_positional_embedding", "stretch_text_encoder", "weights_dir", "pretrained_image_tower", "pretrained_mini_clip",
           "DualEncoder", "encode", "encode_images", "evaluate_retrieval", "fixed_temperature", "split_data"]
