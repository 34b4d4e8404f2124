"""GPT2Config: the model's shape, with the presets under every name people use for the four GPT-2 sizes."""
from __future__ import annotations

import dataclasses
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

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not (0.0 < float(self.layer_norm_epsilon) < 1.0):
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be in (0, 1), got {self.layer_norm_epsilon!r}")

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
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.1,
            "attn_pdrop": 0.1,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        }

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "GPT2Config":
        """Build from a Hugging Face config.json dict; refuses GPT-2 variants this engine does not implement."""
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, but fastgpt2 only runs 'gpt2' models")
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU ('gelu_new')")
        n_embd = d.get("n_embd", 768)
        n_inner = d.get("n_inner")
        if n_inner not in (None, 4 * n_embd):
            raise ValueError(f"{source}: n_inner={n_inner} is not 4 * n_embd; only GPT-2's MLP width is supported")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(flag):
                raise ValueError(f"{source}: {flag}=true is not supported by fastgpt2")
        try:
            return cls(
                vocab_size=d.get("vocab_size", 50257),
                n_positions=d.get("n_positions", d.get("n_ctx", 1024)),
                n_embd=n_embd,
                n_layer=d.get("n_layer", 12),
                n_head=d.get("n_head", 12),
                layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            )
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)
