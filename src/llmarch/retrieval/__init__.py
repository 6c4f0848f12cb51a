"""Retrieval-augmented models: a faiss chunk index, RETRO (chunked cross-attention to retrieved neighbours), DPR
(dense passage retrieval) and Fusion-in-Decoder."""
from llmarch.retrieval.dpr import DPR, in_batch_negatives_loss
from llmarch.retrieval.embed import EncoderEmbedder, HashedNgramEmbedder, embedder_for
from llmarch.retrieval.fid import fid_encode, fid_forward, fid_generate, fid_inputs
from llmarch.retrieval.index import ChunkIndex, chunk_stream
from llmarch.retrieval.neighbours import own_text_exclusion, retrieve_neighbours, retro_generate
from llmarch.retrieval.retro import ChunkedCrossAttention, Neighbours, RetroModel

__all__ = ["ChunkIndex", "ChunkedCrossAttention", "DPR", "EncoderEmbedder", "HashedNgramEmbedder", "Neighbours", "RetroModel",
           "chunk_stream", "embedder_for", "fid_encode", "fid_forward", "fid_generate", "fid_inputs",
           "in_batch_negatives_loss", "own_text_exclusion", "retrieve_neighbours", "retro_generate"]
