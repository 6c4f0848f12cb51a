"""Parallelism beyond data parallel on one DeviceMesh: tensor and sequence (``tensor``), expert (``expert``),
pipeline (``pipeline``) parallel, sharded DCP checkpoints (``dcp``); ``mesh`` validates the degrees and builds the
mesh, ``apply`` wraps a training model for it. See docs/distributed.md."""
from llmarch.train.parallel.mesh import DIMS, MeshSpec, build_mesh, spec_for

__all__ = ["MeshSpec", "build_mesh", "spec_for", "DIMS"]
