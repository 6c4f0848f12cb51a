"""Images: a ViT tower (patch embedding, encoder blocks, pooling heads) and the image-text fusions, each chosen
from a registry keyed by a :class:`~llmarch.vision_config.VisionConfig` value (``pool``, ``fusion``)."""
from llmarch.nn.vision.fusion import FUSIONS, GatedCrossAttention, Projector
from llmarch.nn.vision.joint import JointFusion
from llmarch.nn.vision.pool import POOLS

__all__ = ["FUSIONS", "POOLS", "GatedCrossAttention", "JointFusion", "Projector"]
