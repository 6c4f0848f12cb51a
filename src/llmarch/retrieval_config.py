"""RetrievalConfig: RETRO's retrieval settings (the ``retrieval`` field of :class:`llmarch.ModelConfig`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmarch.validation import check_field_types
from llmarch.validation import check_positive as _check_positive
from llmarch.validation import fail as _fail

if TYPE_CHECKING:
    from llmarch.config import ModelConfig


@dataclass(frozen=True)
class RetrievalConfig:
    """RETRO retrieval (Borgeaud et al. 2022): the decoder is split into chunks of ``chunk_size`` (m) tokens; each
    chunk retrieves ``n_neighbours`` (k) neighbours of ``neighbour_len`` (r) tokens (a chunk and its continuation),
    encoded by a bidirectional stack of ``encoder_layers``; decoder layers listed in ``cca_layers`` (0-based) run
    chunked cross-attention to them."""

    chunk_size: int = 64
    n_neighbours: int = 2
    neighbour_len: int = 128
    cca_layers: tuple[int, ...] = (5,)
    encoder_layers: int = 2

    def __post_init__(self) -> None:
        check_field_types(self, "retrieval.")  # "5,8" from the command line becomes (5, 8)

    def validate(self, cfg: "ModelConfig") -> None:
        for name in ("chunk_size", "neighbour_len", "encoder_layers"):
            _check_positive(f"retrieval.{name}", getattr(self, name))
        if isinstance(self.n_neighbours, bool) or not isinstance(self.n_neighbours, int) or self.n_neighbours < 0:
            _fail("retrieval.n_neighbours", f"must be an integer >= 0, got {self.n_neighbours!r}")
        if cfg.kind != "decoder":
            _fail("retrieval", f"RETRO retrieval needs kind='decoder' (kind is {cfg.kind!r}); set retrieval=None")
        if cfg.norm_placement != "pre":
            _fail("retrieval", "chunked cross-attention is wired pre-norm; set norm_placement='pre'")
        if not self.cca_layers or len(set(self.cca_layers)) != len(self.cca_layers):
            _fail("retrieval.cca_layers", f"needs distinct decoder layer indices, got {self.cca_layers!r}")
        bad = [i for i in self.cca_layers if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < cfg.n_layers]
        if bad:
            _fail("retrieval.cca_layers", f"{bad} outside the decoder layers [0, {cfg.n_layers}) (0-based)")
        if self.neighbour_len > cfg.max_seq_len:
            _fail("retrieval.neighbour_len", f"{self.neighbour_len} exceeds max_seq_len={cfg.max_seq_len}")
