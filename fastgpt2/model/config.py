"""GPT2Config: the model's shape, with the presets under every name people use for the four GPT-2 sizes."""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

# Canonical preset -> (n_layer, n_head, n_embd); all four share vocab 50257 and context 1024.
_SIZES = {
    "124M": (12, 12, 768),
    "355M": (24, 16, 1024),
    "774M": (36, 20, 1280),
    "1558M": (48, 25, 1600),
}
# Every spelling people use (OpenAI's release names, Hugging Face ids, Texar's --config_model) -> canonical preset.
PRESET_ALIASES = {
    "117M": "124M", "124M": "124M", "gpt2": "124M", "gpt2-small": "124M", "openai-community/gpt2": "124M",
    "345M": "355M", "355M": "355M", "gpt2-medium": "355M", "openai-community/gpt2-medium": "355M",
    "774M": "774M", "gpt2-large": "774M", "openai-community/gpt2-large": "774M",
    "1558M": "1558M", "1.5B": "1558M", "gpt2-xl": "1558M", "openai-community/gpt2-xl": "1558M",
}
# Canonical preset -> Hugging Face hub repository holding the official weights.
HUB_REPOS = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}


# activation_function values that are GPT-2's tanh-approximated GELU, the one this model computes.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# Boolean config.json fields that change the function the model computes -> (GPT-2's value, what the other one means).
_ARCHITECTURE_FLAGS = {
    "scale_attn_weights": (True, "attention scores without the 1/sqrt(head_dim) scale"),
    "scale_attn_by_inverse_layer_idx": (False, "attention scores also divided by the layer number"),
    "add_cross_attention": (False, "cross-attention to an encoder in every block"),
    "tie_word_embeddings": (True, "an output head separate from wte"),
}
_JSON_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _read_field(d: dict, source: str, key: str, types, default):
    """d[key] (or `default` when absent) if it has one of `types`; else a ValueError naming `source` and the field."""
    types = types if isinstance(types, tuple) else (types,)
    value = d.get(key, default)
    # JSON true/false are Python bools, which are also ints: only a field that takes booleans accepts them.
    if isinstance(value, types) and (bool in types or not isinstance(value, bool)):
        return value
    expected = " or ".join(_JSON_TYPE_NAMES[t] for t in types if not (t is int and float in types))
    raise ValueError(f"{source}: field {key!r} must be {expected}, got {json.dumps(value)[:60]}; correct that field "
                     f"(GPT-2 124M has {json.dumps(default)})")


def canonical_preset(name: str) -> str | None:
    """The canonical preset ('124M', ...) for any accepted spelling (case-insensitive), or None."""
    lowered = {k.lower(): v for k, v in PRESET_ALIASES.items()}
    return lowered.get(str(name).strip().lower())


@dataclass(slots=True)
class GPT2Config:
    vocab_size: int = 50257  # 50000 BPE merges + 256 byte tokens + <|endoftext|>
    n_positions: int = 1024  # context length; learned position embeddings
    n_embd: int = 768  # model width
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads; head_dim = n_embd // n_head (64 for every GPT-2 size)
    layer_norm_epsilon: float = 1e-5  # as published
    # Dropout in train mode only, where transformers' GPT2LMHeadModel applies it (eval mode and the engine: none).
    embd_pdrop: float = 0.1  # on token + position embeddings
    attn_pdrop: float = 0.1  # on the attention probabilities
    resid_pdrop: float = 0.1  # on each residual branch (attention and MLP outputs)

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 < eps < 1.0):
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
                raise ValueError(f"GPT2Config.{name} must be a dropout probability in [0, 1), got {p!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str) -> "GPT2Config":
        """Preset by any common name: 117M/124M/gpt2, 345M/355M/gpt2-medium, 774M/gpt2-large, 1558M/1.5B/gpt2-xl."""
        preset = canonical_preset(name)
        if preset is None:
            valid = ", ".join(PRESET_ALIASES)
            raise ValueError(f"unknown GPT-2 preset {name!r}; valid names are: {valid}")
        n_layer, n_head, n_embd = _SIZES[preset]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd)

    def num_parameters(self) -> int:
        """Parameter count with the output head tied to wte (124,439,808 for 124M)."""
        c, v, p = self.n_embd, self.vocab_size, self.n_positions
        per_block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)
        return v * c + p * c + self.n_layer * per_block + 2 * c

    def to_hf_dict(self) -> dict:
        """config.json contents in the Hugging Face GPT-2 format."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.resid_pdrop,
            "embd_pdrop": self.embd_pdrop,
            "attn_pdrop": self.attn_pdrop,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        }

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "GPT2Config":
        """Build from a Hugging Face config.json dict; refuses fields of the wrong type (naming `source` and the field)
        and GPT-2 variants this engine does not implement."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object of config fields, got {type(d).__name__}")
        get = functools.partial(_read_field, d, source)
        model_type = get("model_type", str, "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"{source}: model_type is {model_type!r}, but fastgpt2 only runs 'gpt2' models")
        sizes = {name: get(name, int, default) for name, default in
                 (("vocab_size", 50257), ("n_embd", 768), ("n_layer", 12), ("n_head", 12))}
        # Old configs name the context n_ctx; n_positions wins when both are present, as in transformers.
        n_positions = get("n_positions", int, 1024) if "n_positions" in d else get("n_ctx", int, 1024)
        layer_norm_epsilon = get("layer_norm_epsilon", (float, int), 1e-5)
        dropout = {name: get(name, (float, int), 0.1) for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop")}
        act = get("activation_function", str, "gelu_new")
        if act not in _TANH_GELUS:
            raise ValueError(f"{source}: activation_function {act!r} is not supported; fastgpt2 implements only "
                             f"GPT-2's tanh-approximated GELU ('gelu_new' or 'gelu_pytorch_tanh', not the exact "
                             f"'gelu'), so use transformers for this model")
        n_inner = get("n_inner", (int, type(None)), None)
        if n_inner not in (None, 4 * sizes["n_embd"]):
            raise ValueError(f"{source}: n_inner={n_inner} is not 4 * n_embd ({4 * sizes['n_embd']}), the only MLP "
                             f"width fastgpt2 implements; use transformers for this model")
        for flag, (supported, meaning) in _ARCHITECTURE_FLAGS.items():
            if get(flag, bool, supported) != supported:
                raise ValueError(f"{source}: {flag}={str(not supported).lower()} ({meaning}) is not supported by "
                                 f"fastgpt2, which implements GPT-2 with {flag}={str(supported).lower()}; use "
                                 f"transformers for this model")
        # reorder_and_upcast_attn only moves the attention scores to float32 (a numerics option, not another
        # function); every attention path here already accumulates scores and softmax in float32, so it is accepted.
        get("reorder_and_upcast_attn", bool, False)
        try:
            return cls(n_positions=n_positions, layer_norm_epsilon=layer_norm_epsilon, **sizes, **dropout)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_openai_hparams(cls, d: dict, source: str = "hparams.json") -> "GPT2Config":
        """Build from the hparams.json of OpenAI's release ({"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"}, all
        required); refuses a missing field or one of the wrong type, naming `source` and the field."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object of hyperparameters, got {type(d).__name__}")
        fields = {"n_vocab": ("vocab_size", 50257), "n_ctx": ("n_positions", 1024), "n_embd": ("n_embd", 768),
                  "n_head": ("n_head", 12), "n_layer": ("n_layer", 12)}
        missing = [key for key in fields if key not in d]
        if missing:
            raise ValueError(f"{source}: field {missing[0]!r} is missing; OpenAI's hparams.json holds n_vocab, n_ctx, "
                             f"n_embd, n_head and n_layer")
        sizes = {ours: _read_field(d, source, key, int, default) for key, (ours, default) in fields.items()}
        try:
            return cls(**sizes)  # OpenAI's model.py: layer norm epsilon 1e-5, tanh GELU, as the defaults here
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)
