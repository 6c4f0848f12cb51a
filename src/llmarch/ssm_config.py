"""Sub-configs of the linear-time mixers: the Mamba-2 state-space mixer (:class:`SSMConfig`, field ``ssm``) and
the mixture of attention types (:class:`MixtureConfig`, field ``mixture``). Fields of :class:`llmarch.ModelConfig`,
each with its own validate(); read only by the mixers that use them."""
from __future__ import annotations

from dataclasses import dataclass

from llmarch.validation import check_choice, check_field_types, check_positive, fail

MIXER_FORMS = ("parallel", "chunked", "recurrent")
CONTROLLERS = ("mean", "recurrent")
MIXTURE_COMPONENTS = ("attention", "linear", "random", "local")


@dataclass(frozen=True)
class SSMConfig:
    """Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", SSD). Inner width Di = ``expand`` * D, split in
    H = Di / ``head_dim`` heads; B and C have ``d_state`` (N) numbers per token in each of ``n_groups`` groups
    shared by H / n_groups heads; a depthwise causal convolution of ``conv_kernel`` (K) taps over x, B and C.
    dt = clamp(softplus(dt_raw + dt_bias), ``time_step_limit_low``, ``time_step_limit_high``); dt_bias is initialised from dt drawn
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
    time_step_limit_low: float = 0.0
    time_step_limit_high: float | None = None  # None: no upper clamp (transformers' inf)
    form: str = "chunked"

    def __post_init__(self) -> None:
        check_field_types(self, "ssm.")  # JSON lists become tuples; numbers as text are read

    @property
    def time_step_limit(self) -> tuple[float, float]:
        """(low, high) that dt is clamped to; high = inf when ``time_step_limit_high`` is None."""
        high = float("inf") if self.time_step_limit_high is None else self.time_step_limit_high
        return (self.time_step_limit_low, high)

    def inner(self, d_model: int) -> int:
        """Di = expand * D."""
        return self.expand * d_model

    def heads(self, d_model: int) -> int:
        """H = Di / head_dim."""
        return self.inner(d_model) // self.head_dim

    def validate(self, d_model: int) -> None:
        for name in ("d_state", "n_groups", "expand", "head_dim", "conv_kernel", "chunk_size"):
            check_positive(f"ssm.{name}", getattr(self, name))
        if self.inner(d_model) % self.head_dim:
            fail("ssm.head_dim", f"must divide expand * d_model = {self.inner(d_model)}, got {self.head_dim}")
        if self.heads(d_model) % self.n_groups:
            fail("ssm.n_groups", f"must divide the {self.heads(d_model)} heads, got {self.n_groups}")
        if not 0 < self.time_step_min <= self.time_step_max:
            fail("ssm.time_step_min", f"need 0 < time_step_min <= time_step_max, got {self.time_step_min}, "
                  f"{self.time_step_max}")
        lo, hi = self.time_step_limit
        if not 0.0 <= lo < hi:
            fail("ssm.time_step_limit_low", f"need 0 <= time_step_limit_low < time_step_limit_high (None: no "
                 f"upper limit), got {lo}, {self.time_step_limit_high}")

    def validate_form(self) -> None:
        check_choice("ssm.form", self.form, MIXER_FORMS)
        check_positive("ssm.chunk_size", self.chunk_size)


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
        check_field_types(self, "mixture.")

    def validate(self) -> None:
        if len(self.components) < 2:
            fail("mixture.components", f"needs at least two components to mix, got {self.components}")
        for c in self.components:
            check_choice("mixture.components", c, MIXTURE_COMPONENTS)
        if len(set(self.components)) != len(self.components):
            fail("mixture.components", f"lists a component twice: {self.components}")
        check_choice("mixture.controller", self.controller, CONTROLLERS)
        check_positive("mixture.window", self.window)
        check_positive("mixture.controller_dim", self.controller_dim)
