"""Training FLOPs per token for each mixer, for tokens/s -> MFU. Matmuls count 2*m*n*k; training = 3x forward.

Elementwise work (GELU, LayerNorm, softmax) is left out, as in the usual MFU accounting (PaLM, nanoGPT).
"""

from __future__ import annotations

import math

from hypermixer.config import EncoderConfig


def mixer_forward_flops_per_token(config: EncoderConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one layer's token mixer at sequence length seq_len."""
    d, heads = config.hidden_size, config.num_heads
    if config.mixer == "hypermixer":
        # None resolves to hidden_size in EncoderConfig.__post_init__; `or d` says so to a type checker too.
        hyper_hidden = config.hypermixer_hypernet_hidden_size or d
        mixing = config.hypermixer_token_mixing_size or d
        # Per head: (d/H -> hidden/H -> d'/H) for every token; summed over heads this is d*hidden/H + hidden*d'/H.
        one_hypernet = 2 * (d * hyper_hidden + hyper_hidden * mixing) / heads
        hypernets = one_hypernet * (1 if config.hypermixer_tied else 2)
        # W1ᵀ·X and W2·(...): per head 2 * N * (d'/H) * (d/H) each, i.e. per token 2 * d' * d / H each.
        token_mixing = 2 * (2 * mixing * d / heads)
        return hypernets + token_mixing
    if config.mixer == "transformer":
        projections = 2 * 4 * d * d  # q, k, v, out
        scores_and_values = 2 * 2 * seq_len * d  # QKᵀ and AV, both linear in N per token
        return projections + scores_and_values
    if config.mixer == "mlpmixer":
        # Over the N used positions (the weights are sliced to N): 2 * N * T per feature, twice, per sequence.
        return 2 * 2 * (config.mlpmixer_token_mixing_size or config.max_seq_len) * d
    if config.mixer == "fnet":
        # A complex FFT of size n costs ~5 n log2 n; the 2-D FFT of N x d, divided over N tokens.
        return 5 * d * math.log2(max(seq_len * d, 2))
    raise ValueError(f"flops: unknown mixer {config.mixer!r}")


def forward_flops_per_token(config: EncoderConfig, seq_len: int, mlm_fraction: float = 0.0) -> float:
    """Forward FLOPs per token of the encoder, plus the MLM head at `mlm_fraction` of the tokens."""
    d = config.hidden_size
    feature_mlp = 2 * 2 * d * config.intermediate_size
    per_layer = mixer_forward_flops_per_token(config, seq_len) + feature_mlp
    head = mlm_fraction * (2 * d * d + 2 * d * config.vocab_size)
    return config.num_layers * per_layer + head


def flops_per_token(config: EncoderConfig, seq_len: int, mlm_fraction: float = 0.0) -> float:
    """Training (forward + backward) FLOPs per token: 3x the forward."""
    return 3.0 * forward_flops_per_token(config, seq_len, mlm_fraction)
