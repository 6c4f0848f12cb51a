"""Sub-configs of the linear-time mixers: the Mamba-2 state-space mixer (:class:`SSMConfig`, field ``ssm``) and
the mixture of attention types (:class:`MixtureConfig`, field ``mixture``). Fields of :class:`llmarch.ModelConfig`,
each with its own validate(); read only by the mixers that use them."""
from __future__ import annotations

from dataclasses import dataclass

from llmarch.attention_config import _checks, _tuple_field

MIXER_FORMS = ("parallel", "chunked", "recurrent")
CONTROLLERS = ("mean", "recurrent")
MIXTURE_COMPONENTS = ("attention", "linear", "random", "local")


@dataclass(frozen=True)
class SSMConfig:
    """Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", SSD). Inner width Di = ``expand`` * D, split in
    H = Di / ``head_dim`` heads; B and C have ``d_state`` (N) numbers per token in each of ``n_groups`` groups
    shared by H / n_groups heads; a depthwise causal convolution of ``conv_kernel`` (K) taps over x, B and C.
    dt = clamp(softplus(dt_raw + dt_bias), ``time_step_limit``); dt_bias is initialised from dt drawn
    log-uniformly in [``time_step_min``, ``time_step_max``] (floored at ``time_step_floor``).
    ``form``: how a full sequence is computed by every linear-time mixer of the model (mamba2, linear, the
    mixture's linear component): parallel, the quadratic "attention" form, the readable spec; chunked, blocks of
    ``chunk_size``, linear in length; recurrent, one step per token. Decoding one token with a cache always takes
    the recurrent step. ``proj_bias``: biases on in/out projections; ``conv_bias``: on the
    convolution."""

    d_state: int = 128
    n_groups: int = 1
    expand: int = 2
    head_dim: int = 64
    conv_kernel: int = 4
    chunk_size: int = 256
    proj_bias: bool = False
    conv_bias: bool = True
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    form: str = "chunked"

    def __post_init__(self) -> None:
        _tuple_field(self, "time_step_limit")

    def inner(self, d_model: int) -> int:
        """Di = expand * D."""
        return self.expand * d_model

    def heads(self, d_model: int) -> int:
        """H = Di / head_dim."""
        return self.inner(d_model) // self.head_dim

    def validate(self, d_model: int) -> None:
        _fail, _check_positive, _check_choice = _checks()
        for name in ("d_state", "n_groups", "expand", "head_dim", "conv_kernel", "chunk_size"):
            _check_positive(f"ssm.{name}", getattr(self, name))
        if self.inner(d_model) % self.head_dim:
            _fail("ssm.head_dim", f"must divide expand * d_model = {self.inner(d_model)}, got {self.head_dim}")
        if self.heads(d_model) % self.n_groups:
            _fail("ssm.n_groups", f"must divide the {self.heads(d_model)} heads, got {self.n_groups}")
        if not 0 < self.time_step_min <= self.time_step_max:
            _fail("ssm.time_step_min", f"need 0 < time_step_min <= time_step_max, got {self.time_step_min}, "
                  f"{self.time_step_max}")
        lo, hi = self.time_step_limit if len(self.time_step_limit) == 2 else (None, None)
        if lo is None or not 0.0 <= lo < hi:
            _fail("ssm.time_step_limit", f"must be (low, high) with 0 <= low < high, got {self.time_step_limit}")

    def validate_form(self) -> None:
        _fail, _check_positive, _check_choice = _checks()
        _check_choice("ssm.form", self.form, MIXER_FORMS)
        _check_positive("ssm.chunk_size", self.chunk_size)


@dataclass(frozen=True)
class MixtureConfig:
    """The mixture of attention types (seed 002, "NextGenLLM"): ``components`` run side by side on the same input
    (attention: the layer's own pattern; linear: linear attention; random: attention under the "random" pattern;
    local: attention under a sliding window of ``window``), and a ``controller`` weighs their outputs per token
    with a softmax (mean: the causal running mean of the inputs -> linear; recurrent: a GRU of ``controller_dim``
    over the inputs -> linear)."""

    components: tuple[str, ...] = ("attention", "linear", "random", "local")
    controller: str = "mean"
    window: int = 64
    controller_dim: int = 64

    def __post_init__(self) -> None:
        _tuple_field(self, "components")

    def validate(self) -> None:
        _fail, _check_positive, _check_choice = _checks()
        if len(self.components) < 2:
            _fail("mixture.components", f"needs at least two components to mix, got {self.components}")
        for c in self.components:
            _check_choice("mixture.components", c, MIXTURE_COMPONENTS)
        if len(set(self.components)) != len(self.components):
            _fail("mixture.components", f"lists a component twice: {self.components}")
        _check_choice("mixture.controller", self.controller, CONTROLLERS)
        _check_positive("mixture.window", self.window)
        _check_positive("mixture.controller_dim", self.controller_dim)
