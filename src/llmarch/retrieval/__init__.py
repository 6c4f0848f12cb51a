"""Retrieval-augmented models: a faiss chunk index, RETRO (chunked cross-attention to retrieved neighbours), DPR
(dense passage retrieval) and Fusion-in-Decoder."""
from llmarch.retrieval.embed import EncoderEmbedder
from llmarch.retrieval.index import ChunkIndex, chunk_stream

__all__ = ["ChunkIndex", "EncoderEmbedder", "chunk_stream"]
