"""The device mesh of a run: one ``init_device_mesh`` with named dims ("pp", "dp", "tp"), sized from the flags
``--dp D --tp T --pp P --ep E`` and validated against the world size and the model before anything is built.

Dims, outermost first: ``pp`` (pipeline stages), ``dp`` (data parallel: DDP or FSDP2 shards), ``tp`` (tensor
parallel, innermost so its frequent collectives stay on the fastest links). Expert parallelism borrows the data
parallel ranks (as in GShard, Lepikhin et al. 2020): ``ep`` must equal ``dp`` and experts are sharded over the
``dp`` dim, each rank routing its own tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from llmarch.config import ModelConfig

DIMS = ("pp", "dp", "tp")


@dataclass(frozen=True)
class MeshSpec:
    """Degrees of each axis; ``dp`` None = what the world size leaves after tp and pp."""

    dp: int | None = None
    tp: int = 1
    ep: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "ep", "pp"):
            v = getattr(self, name)
            if v is None and name == "dp":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be a positive integer, got {v!r}")

    def resolve(self, world: int) -> "MeshSpec":
        """The spec with ``dp`` filled in and the product checked against the world size."""
        if world % (self.tp * self.pp):
            raise ValueError(f"tp * pp = {self.tp} * {self.pp} does not divide the world size {world}; "
                             "choose --tp and --pp whose product divides --nproc")
        dp = self.dp if self.dp is not None else world // (self.tp * self.pp)
        if dp * self.tp * self.pp != world:
            raise ValueError(f"dp * tp * pp = {dp} * {self.tp} * {self.pp} = {dp * self.tp * self.pp} must equal "
                             f"the world size {world}; set --dp {world // (self.tp * self.pp)} or change --nproc")
        if self.ep > 1 and self.ep != dp:
            raise ValueError(f"ep: expert parallelism shards experts over the data-parallel ranks, so ep must equal "
                             f"dp = {dp} (got {self.ep}); set --ep {dp} or --ep 1")
        return MeshSpec(dp, self.tp, self.ep, self.pp)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.pp, self.dp or 1, self.tp)

    @property
    def trivial(self) -> bool:
        """Only data parallelism (the plain DDP / FSDP2 path)."""
        return self.tp == self.ep == self.pp == 1

    def check_model(self, cfg: ModelConfig) -> None:
        """Divisibility of the model's sizes by the degrees that split them (ValueError naming the field)."""
        tp = self.tp
        if tp > 1:
            for field, n in (("n_heads", cfg.n_heads), ("d_ff", cfg.d_ff), ("vocab_size", cfg.vocab_size)):
                if n % tp:
                    raise ValueError(f"{field}: {n} is not divisible by tp = {tp}; choose --tp dividing it")
            G = cfg.kv_heads  # G < tp: each kv head copied on tp / G ranks
            if (G % tp if G >= tp else tp % G):
                raise ValueError(f"n_kv_heads: {G} and tp = {tp} must divide one another (kv heads split over the "
                                 "ranks, or each copied on tp / n_kv_heads ranks); choose --tp accordingly")
            if cfg.position in ("alibi", "relative"):
                raise ValueError(f"position: {cfg.position!r} adds a per-head score bias over all heads, which tensor "
                                 "parallel does not split yet; use --tp 1 for this model")
            if cfg.moe is not None:
                raise ValueError("moe: tensor parallel does not split MoE layers (every tp rank would hold all the "
                                 "experts, the bulk of an MoE model's weights); shard the experts over the "
                                 "data-parallel ranks instead: --tp 1 --ep N --parallel ddp")
        if self.ep > 1:
            if cfg.moe is None:
                raise ValueError("ep: expert parallelism needs an MoE model (config field moe); use --ep 1")
            if cfg.moe.n_experts % self.ep:
                raise ValueError(f"moe.n_experts: {cfg.moe.n_experts} is not divisible by ep = {self.ep}; "
                                 "choose --ep dividing it")
        if self.pp > 1:
            if cfg.kind != "decoder":
                raise ValueError(f"pp: pipeline parallelism splits decoder stacks; kind is {cfg.kind!r}, use --pp 1")
            if cfg.moe is not None or cfg.tie_embeddings:
                raise ValueError("pp: pipeline stages are cut from dense decoders whose head is not tied to the "
                                 "embedding (moe None, tie_embeddings false); use --pp 1 or --set "
                                 "tie_embeddings=false")
            if cfg.n_layers % self.pp:
                raise ValueError(f"n_layers: {cfg.n_layers} is not divisible by pp = {self.pp}; choose --pp "
                                 "dividing it")


def build_mesh(spec: MeshSpec, device_type: str = "cpu"):
    """One DeviceMesh of shape (pp, dp, tp) named ``DIMS`` over the current process group. Collective."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, spec.shape, mesh_dim_names=DIMS)


def spec_for(cfg: ModelConfig, world: int, dp: int | None = None, tp: int = 1, ep: int = 1,
             pp: int = 1) -> MeshSpec:
    """Resolve and validate a mesh for ``cfg`` on ``world`` processes."""
    spec = MeshSpec(dp, tp, ep, pp).resolve(world)
    spec.check_model(cfg)
    return spec


__all__ = ["MeshSpec", "build_mesh", "spec_for", "DIMS"]
