"""Images: a ViT tower (patch embedding or tiles, encoder blocks, pooling heads) and the image-text fusions, each
chosen from a registry keyed by a :class:`~llmarch.vision_config.VisionConfig` value (``positions``, ``pool``,
``projector``, ``fusion``)."""
from llmarch.nn.vision.fusion import FUSIONS, PROJECTORS, GatedCrossAttention, Projector
from llmarch.nn.vision import cross_blocks, tiles  # noqa: F401  (registration)
from llmarch.nn.vision.joint import JointFusion
from llmarch.nn.vision.patch import PATCH_EMBEDDINGS
from llmarch.nn.vision.pool import POOLS

__all__ = ["FUSIONS", "PATCH_EMBEDDINGS", "POOLS", "PROJECTORS", "GatedCrossAttention", "JointFusion", "Projector"]
