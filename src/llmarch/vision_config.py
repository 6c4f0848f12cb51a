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

POST_NORMS = ("pooled", "all", "none")  # CLIP: the pooled class token; SigLIP: every position
FEATURE_SELECTS = ("default", "full")  # LLaVA: default drops the class token, full keeps it


@dataclass(frozen=True)
class VisionConfig:
    """A ViT tower: conv patch embedding (+ class token) + learned positions, pre-norm LayerNorm encoder blocks
    with MLPs and biases everywhere, an optional LayerNorm before the blocks (CLIP's ``pre_layrnorm``), a final
    LayerNorm (``post_norm``) and a pooling head (``pool``: class_token | attention | none).

    Fusion fields (used when this is a ``ModelConfig.vision``): ``feature_layer`` indexes the tower's hidden
    states (0 = embeddings, L = last block, negative from the end), or ``feature_layers`` several of them,
    concatenated on the feature axis; ``feature_select`` default | full;
    ``fusion`` projector | cross_attention | joint; ``image_token_id`` marks the text slots the projected features
    fill; ``cross_layers`` are the decoder layers that get gated cross-attention (fusion cross_attention) or that
    run over [image; text] (fusion joint)."""

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
    cross_layers: tuple[int, ...] = ()  # cross_attention / joint: the decoder layers that read the image

    def __post_init__(self) -> None:
        if isinstance(self.cross_layers, (list, str, int)):  # [1, 3], "1,3" or 3
            layers = self.cross_layers.split(",") if isinstance(self.cross_layers, str) else self.cross_layers
            object.__setattr__(self, "cross_layers", tuple([layers] if isinstance(layers, int) else
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
    def image_tokens(self) -> int:
        """N: feature vectors one image contributes to a language model."""
        drop = self.class_token and self.feature_select == "default"
        return self.n_positions - int(drop)

    @property
    def selected_layers(self) -> tuple[int, ...]:
        """The hidden states a language model reads, as non-negative indices (0 = embeddings): ``feature_layers``
        when given (transformers' list-valued ``vision_feature_layer``), else ``feature_layer``."""
        return tuple(i % (self.n_layers + 1) for i in (self.feature_layers or (self.feature_layer,)))

    @property
    def feature_depth(self) -> int:
        """How many blocks run to reach the deepest selected hidden state."""
        return max(self.selected_layers)

    @property
    def feature_dim(self) -> int:
        """Dv of the features the projector reads: the tower width times the number of selected hidden states."""
        return self.d_model * len(self.selected_layers)

    def encoder_config(self) -> "ModelConfig":
        """The tower's blocks as an encoder ModelConfig (pre-norm LayerNorm, MLP, biases, no positions: the patch
        embedding adds them)."""
        from llmarch.config import ModelConfig

        return ModelConfig(kind="encoder", vocab_size=1, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, d_ff=self.d_ff, max_seq_len=self.n_positions, norm="layernorm",
                           norm_eps=self.norm_eps, norm_placement="pre", final_norm=False, ffn="mlp",
                           activation=self.activation, ffn_bias=True, qkv_bias=True, out_bias=True,
                           position="none")

    # --- validation -----------------------------------------------------------------------------------------
    def validate(self, model: "ModelConfig | None" = None) -> None:
        from llmarch.nn.activation import ACTIVATIONS
        from llmarch.nn.vision import FUSIONS, POOLS

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
        if self.init_std <= 0:
            _fail("vision.init_std", f"must be > 0, got {self.init_std}")
        if self.post_norm == "pooled" and self.pool == "none":
            _fail("vision.post_norm", "'pooled' needs a pooling head; use post_norm='all' or 'none'")
        if self.pool == "class_token" and not self.class_token:
            _fail("vision.pool", "'class_token' needs class_token=True; use pool='attention' or 'none'")
        for name, layers in (("feature_layer", (self.feature_layer,)), ("feature_layers", self.feature_layers)):
            bad = [i for i in layers if not -(self.n_layers + 1) <= i <= self.n_layers]
            if bad:
                _fail(f"vision.{name}", f"{bad[0]} is outside the hidden states [-{self.n_layers + 1}, "
                      f"{self.n_layers}] (0 = embeddings)")
        if model is not None:
            self.validate_fusion(model)

    def validate_fusion(self, model: "ModelConfig") -> None:
        from llmarch.nn.vision import FUSIONS

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
            if self.fusion == "cross_attention" and model.norm_placement != "pre":
                _fail("vision", "gated cross-attention is wired pre-norm; set norm_placement='pre'")
        FUSIONS[self.fusion].check(self, model)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        d = dataclasses.asdict(self)
        d["cross_layers"] = list(self.cross_layers)
        d["feature_layers"] = list(self.feature_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        return sub_config(cls, d, "vision", nullable=False)

    def replace(self, **changes: Any) -> "VisionConfig":
        import dataclasses

        return dataclasses.replace(self, **changes)


__all__ = ["VisionConfig", "POST_NORMS", "FEATURE_SELECTS"]
