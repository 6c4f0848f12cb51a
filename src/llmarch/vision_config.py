"""VisionConfig: a ViT image encoder (Dosovitskiy et al. 2021) and how its features reach a language model.

Alone it describes a vision tower (CLIP's or SigLIP's, ``llmarch.build(VisionConfig(...))``); as the ``vision``
field of :class:`llmarch.ModelConfig` it adds the tower and a fusion to a decoder (LLaVA: a projector whose
outputs replace the image tokens of the text; or gated cross-attention layers on a schedule, Flamingo-style).

Glossary additions: P patch size, N image tokens per image (patches, + 1 with a class token), C channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from llmarch.validation import check_choice as _check_choice
from llmarch.validation import check_field_types, sub_config
from llmarch.validation import check_positive as _check_positive
from llmarch.validation import fail as _fail

if TYPE_CHECKING:
    from llmarch.config import ModelConfig

POST_NORMS = ("pooled", "all", "local", "none")  # CLIP: the pooled class token; SigLIP: every position;
# mllama: the local blocks' output, before the global blocks
FEATURE_SELECTS = ("default", "full")  # LLaVA: default drops the class token, full keeps it


@dataclass(frozen=True)
class VisionConfig:
    """A ViT tower: conv patch embedding (+ class token) + learned positions, pre-norm LayerNorm encoder blocks
    with MLPs and biases everywhere, an optional LayerNorm before the blocks (CLIP's ``pre_layrnorm``), a final
    LayerNorm (``post_norm``) and a pooling head (``pool``: class_token | attention | none).

    Fusion fields (used when this is a ``ModelConfig.vision``): ``feature_layer`` indexes the tower's hidden
    states (0 = embeddings, L = last block, negative from the end), or ``feature_layers`` several of them,
    concatenated on the feature axis; ``feature_select`` default | full; ``fusion`` projector | cross_attention |
    cross_blocks | joint; ``image_token_id`` marks the text slots the projected features fill; ``cross_layers`` are
    the decoder layers that get gated cross-attention (cross_attention), that are replaced by gated cross-attention
    blocks (cross_blocks, Llama 3.2 Vision) or that run over [image; text] (joint).

    Tiles (``positions='gated_tiles'``, mllama): pixel_values [n, tiles, C, H, W] with aspect-ratio ids; per tile a
    class token and the patches, padded to a multiple of ``pad_to``; ``global_layers`` gated blocks see every tile;
    the features are the selected state(s) with the ``intermediate_layers`` states concatenated."""

    kind: ClassVar[str] = "vision"  # what `llmarch presets` lists (text configs: decoder / encoder / ...)

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int = 3072
    activation: str = "quick_gelu"
    norm_eps: float = 1e-5
    patch_bias: bool = False  # a bias on the patch convolution (SigLIP)
    class_token: bool = True  # a learned token before the patches (CLIP)
    pre_norm: bool = True  # a LayerNorm on the embeddings before the blocks (CLIP)
    post_norm: str = "pooled"  # POST_NORMS
    pool: str = "class_token"  # registry nn.vision.POOLS
    init_std: float = 0.02  # normal init of a tower built alone (inside a ModelConfig the model's init_std)
    # --- fusion into a language model ----------------------------------------------------------------------
    feature_layer: int = -2
    feature_layers: tuple[int, ...] = ()  # several hidden states concatenated on the feature axis (overrides the one)
    feature_select: str = "default"
    fusion: str = "projector"  # registry nn.vision.FUSIONS
    projector_activation: str = "gelu"
    projector_bias: bool = True
    image_token_id: int | None = None
    cross_layers: tuple[int, ...] = ()  # cross_attention / cross_blocks / joint: the decoder layers reading images
    projector: str = "mlp"  # registry nn.vision.PROJECTORS: mlp (LLaVA) | linear (mllama)
    extra_token_rows: int = 0  # token-embedding rows past vocab_size (mllama: 8, the image token among them)
    # --- tiles (Llama 3.2 Vision): an image cut into up to max_num_tiles tiles, each a patch grid -------------
    positions: str = "learned"  # registry nn.vision.PATCH_EMBEDDINGS: learned | gated_tiles
    max_num_tiles: int = 1
    pad_to: int = 1  # tokens per tile padded to a multiple of this (mllama: 8); a padding token sees real ones only
    global_layers: int = 0  # tanh-gated blocks over all tiles after the local blocks (and post_norm "local")
    intermediate_layers: tuple[int, ...] = ()  # hidden states (0 = embeddings) concatenated to the features
    attn_bias: bool = True  # biases on the blocks' q/k/v/o projections (mllama: none)

    def __post_init__(self) -> None:
        for name in ("cross_layers", "feature_layers", "intermediate_layers"):
            value = getattr(self, name)
            if isinstance(value, (list, str, int)):  # [1, 3], "1,3" or 3
                layers = value.split(",") if isinstance(value, str) else value
                object.__setattr__(self, name, tuple([layers] if isinstance(layers, int) else
                                                     (i for i in layers if str(i).strip())))
        check_field_types(self, "vision.")  # numbers from text, ("1", "3") -> (1, 3)
        self.validate()

    # --- derived sizes --------------------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Patches per side at ``image_size`` (a remainder narrower than a patch is not seen, as in SigLIP 384/14)."""
        return self.image_size // self.patch_size

    @property
    def n_positions(self) -> int:
        """Rows of the learned position table: patches (+ 1 for the class token)."""
        return self.grid ** 2 + int(self.class_token)

    @property
    def tile_tokens(self) -> int:
        """Feature vectors one tile contributes to a language model."""
        drop = self.class_token and self.feature_select == "default"
        return self.n_positions - int(drop)

    @property
    def image_tokens(self) -> int:
        """N: feature vectors one image contributes to a language model (every tile's)."""
        return self.max_num_tiles * self.tile_tokens

    @property
    def selected_layers(self) -> tuple[int, ...]:
        """The hidden states a language model reads, as non-negative indices (0 = embeddings, the global blocks
        after the local ones): ``feature_layers`` when given (transformers' list-valued ``vision_feature_layer``),
        else ``feature_layer``."""
        depth = self.n_layers + self.global_layers
        return tuple(i % (depth + 1) for i in (self.feature_layers or (self.feature_layer,)))

    @property
    def feature_depth(self) -> int:
        """How many blocks run to reach the deepest state read (selected or ``intermediate_layers``)."""
        return max((*self.selected_layers, *self.intermediate_layers))

    @property
    def feature_dim(self) -> int:
        """Dv of the features the projector reads: the tower width times the number of states read (the selected
        ones and each of ``intermediate_layers``)."""
        return self.d_model * (len(self.selected_layers) + len(self.intermediate_layers))

    def encoder_config(self, n_layers: int | None = None) -> "ModelConfig":
        """The tower's blocks as an encoder ModelConfig (pre-norm LayerNorm, MLP, biases, no positions: the patch
        embedding adds them)."""
        from llmarch.config import ModelConfig

        return ModelConfig(kind="encoder", vocab_size=1, d_model=self.d_model, n_layers=n_layers or self.n_layers,
                           n_heads=self.n_heads, d_ff=self.d_ff, max_seq_len=self.n_positions, norm="layernorm",
                           norm_eps=self.norm_eps, norm_placement="pre", final_norm=False, ffn="mlp",
                           activation=self.activation, ffn_bias=True, qkv_bias=self.attn_bias, out_bias=self.attn_bias,
                           position="none")

    # --- validation -----------------------------------------------------------------------------------------
    def validate(self, model: "ModelConfig | None" = None) -> None:
        from llmarch.nn.activation import ACTIVATIONS
        from llmarch.nn.vision import FUSIONS, PATCH_EMBEDDINGS, POOLS, PROJECTORS

        for name in ("image_size", "patch_size", "channels", "d_model", "n_layers", "n_heads", "d_ff"):
            _check_positive(f"vision.{name}", getattr(self, name))
        if self.patch_size > self.image_size:
            _fail("vision.patch_size", f"{self.patch_size} is larger than image_size {self.image_size}")
        if self.d_model % self.n_heads:
            _fail("vision.n_heads", f"must divide vision.d_model ({self.d_model} % {self.n_heads} != 0)")
        if self.norm_eps <= 0:
            _fail("vision.norm_eps", f"must be > 0, got {self.norm_eps}")
        _check_choice("vision.activation", self.activation, ACTIVATIONS)
        _check_choice("vision.projector_activation", self.projector_activation, ACTIVATIONS)
        _check_choice("vision.post_norm", self.post_norm, POST_NORMS)
        _check_choice("vision.pool", self.pool, POOLS)
        _check_choice("vision.feature_select", self.feature_select, FEATURE_SELECTS)
        _check_choice("vision.fusion", self.fusion, FUSIONS)
        _check_choice("vision.projector", self.projector, PROJECTORS)
        _check_choice("vision.positions", self.positions, PATCH_EMBEDDINGS)
        for name in ("max_num_tiles", "pad_to"):
            _check_positive(f"vision.{name}", getattr(self, name))
        for name in ("global_layers", "extra_token_rows"):
            if getattr(self, name) < 0:
                _fail(f"vision.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.positions == "learned" and self.max_num_tiles != 1:
            _fail("vision.max_num_tiles", "tiles need positions='gated_tiles' (tile embeddings by aspect ratio)")
        if self.positions == "gated_tiles" and not self.class_token:
            _fail("vision.class_token", "positions='gated_tiles' has a class token per tile; set class_token=True")
        if self.global_layers and self.positions != "gated_tiles":
            _fail("vision.global_layers", "global blocks read the post-tile embedding; set positions='gated_tiles'")
        if (self.post_norm == "local") != (self.global_layers > 0):
            _fail("vision.post_norm", "'local' (a norm between the local and the global blocks) goes with "
                  f"global_layers > 0; got post_norm={self.post_norm!r}, global_layers={self.global_layers}")
        bad = [i for i in self.intermediate_layers if not 0 <= i <= self.n_layers]
        if bad:
            _fail("vision.intermediate_layers", f"{bad} are outside the local hidden states [0, {self.n_layers}]")
        if self.init_std <= 0:
            _fail("vision.init_std", f"must be > 0, got {self.init_std}")
        if self.post_norm == "pooled" and self.pool == "none":
            _fail("vision.post_norm", "'pooled' needs a pooling head; use post_norm='all' or 'none'")
        if self.pool == "class_token" and not self.class_token:
            _fail("vision.pool", "'class_token' needs class_token=True; use pool='attention' or 'none'")
        depth = self.n_layers + self.global_layers
        for name, layers in (("feature_layer", (self.feature_layer,)), ("feature_layers", self.feature_layers)):
            bad = [i for i in layers if not -(depth + 1) <= i <= depth]
            if bad:
                _fail(f"vision.{name}", f"{bad[0]} is outside the hidden states [-{depth + 1}, {depth}] "
                      "(0 = embeddings)")
        if model is not None:
            self.validate_fusion(model)

    def validate_fusion(self, model: "ModelConfig") -> None:
        from llmarch.nn.vision import FUSIONS

        if self.extra_token_rows and model.tie_embeddings:
            _fail("vision.extra_token_rows", "extra embedding rows need an untied head; set tie_embeddings=False")
        if model.kind != "decoder":
            _fail("vision", f"image fusion needs kind='decoder' (kind is {model.kind!r}); set vision=None")
        if model.retrieval is not None:
            _fail("vision", "vision and retrieval cannot be combined yet; set one of them to None")
        if self.fusion == "projector":
            if self.image_token_id is None or not 0 <= self.image_token_id < model.vocab_size:
                _fail("vision.image_token_id", f"the projector fusion places image features at this token; give "
                      f"an id in [0, {model.vocab_size}), got {self.image_token_id!r}")
        else:
            if not self.cross_layers:
                _fail("vision.cross_layers", f"{self.fusion} fusion needs decoder layer indices, e.g. (1, 3)")
            bad = [i for i in self.cross_layers if not 0 <= i < model.n_layers]
            if bad or len(set(self.cross_layers)) != len(self.cross_layers):
                _fail("vision.cross_layers", f"needs distinct layers in [0, {model.n_layers}), "
                      f"got {self.cross_layers}")
        FUSIONS[self.fusion].check(self, model)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        d = dataclasses.asdict(self)
        d["cross_layers"] = list(self.cross_layers)
        d["feature_layers"] = list(self.feature_layers)
        d["intermediate_layers"] = list(self.intermediate_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        return sub_config(cls, d, "vision", nullable=False)

    def replace(self, **changes: Any) -> "VisionConfig":
        import dataclasses

        return dataclasses.replace(self, **changes)


__all__ = ["VisionConfig", "POST_NORMS", "FEATURE_SELECTS"]
