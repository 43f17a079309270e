"""HyperMixing: token mixing whose MLP is generated per input by hypernetworks (Mai et al., ACL 2023).

For tokens X (N x d) and position information P, per head h:
    W1 = h1(X + P), W2 = h2(X + P)         (each N x d'/H, one row per token)
    TM(X) = W2 · GELU(W1ᵀ · X)             (N x d/H)
The sum over tokens inside W1ᵀ·X is what makes the cost linear in N. Padded positions are zeroed in
W1, W2 and X, so they contribute nothing and appending padding leaves real positions unchanged.
The formula is the paper's; multi-head, tying and masking follow the semantics of the authors'
MIT-licensed module (github idiap/hypermixing), with two differences that change numbers, not the
model family: our hypernetworks have biases and a per-head Xavier initialisation (see ParallelMLPs),
and their input is X + P (the authors' module uses X·sqrt(d) + P). This is our own code.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from hypermixer.config import EncoderConfig


class ParallelMLPs(nn.Module):
    """H independent two-layer MLPs, one per head: (..., H, N, in) -> (..., H, N, out)."""

    def __init__(self, num_heads: int, in_size: int, hidden_size: int, out_size: int) -> None:
        super().__init__()
        self.fc1_weight = nn.Parameter(torch.empty(num_heads, in_size, hidden_size))
        self.fc1_bias = nn.Parameter(torch.zeros(num_heads, 1, hidden_size))
        self.fc2_weight = nn.Parameter(torch.empty(num_heads, hidden_size, out_size))
        self.fc2_bias = nn.Parameter(torch.zeros(num_heads, 1, out_size))
        # Xavier-uniform with gain sqrt(2), computed per head (fans: one head's input and output sizes).
        # This is not the authors' exact scheme: their module applies Xavier to the whole 3-D
        # (heads, out, in) tensor, whose fans also count the other size and the heads, so their weights
        # are several times smaller. Measured on LayerNorm'd inputs with sinusoidal positions, our
        # generated W1 starts at std ~1.7 (d = 128 to 768); the authors' scheme on the same inputs gives
        # ~0.04 (they also scale the input by sqrt(d) before adding positions). The LayerNorm on the
        # mixer's output (hypermixer_layer_norm) removes the overall scale from the forward pass.
        for weight in (self.fc1_weight, self.fc2_weight):
            for head in weight.data:
                nn.init.xavier_uniform_(head, gain=math.sqrt(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, N, in)
        hidden = F.gelu(torch.matmul(x, self.fc1_weight) + self.fc1_bias)
        return torch.matmul(hidden, self.fc2_weight) + self.fc2_bias


@lru_cache(maxsize=32)
def sinusoidal_positions(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The Transformer's sine/cosine table (length x dim), built once per (length, dim, device, dtype) and
    shared by every layer and forward (no length limit applies). The cached tensor is read-only by contract."""
    work = torch.promote_types(dtype, torch.float32)  # at least fp32, even for a bf16 model
    position = torch.arange(length, device=device, dtype=work).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=work) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device, dtype=work)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table.to(dtype)


def token_sum(w1: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """W1ᵀ·X, summed over the N tokens in at least fp32 whatever the model's dtype (under autocast too): in
    bf16 or fp16 a sum over 16k tokens would lose most of its bits. Unchanged for an fp32/fp64 model."""
    work = torch.promote_types(torch.promote_types(w1.dtype, values.dtype), torch.float32)
    if w1.dtype == work and values.dtype == work and not torch.is_autocast_enabled(w1.device.type):
        return torch.matmul(w1.transpose(-1, -2), values)
    with torch.autocast(w1.device.type, enabled=False):
        return torch.matmul(w1.transpose(-1, -2).to(work), values.to(work))


class HyperMixing(nn.Module):
    """Multi-head HyperMixing token mixer, tied or untied.

    forward(x, mask) mixes a sequence with itself. For cross-mixing (queries that differ from the
    keys/values) pass `query` and `query_mask`: W1 then comes from the keys and W2 from the queries,
    which is why a tied module (one hypernetwork for both) refuses a separate query.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_size = config.head_size
        self.tied = config.hypermixer_tied
        self.position = config.hypermixer_position
        hidden = config.hypermixer_hypernet_hidden_size // config.num_heads
        mixing = config.hypermixer_token_mixing_size // config.num_heads
        self.hyper_w1 = ParallelMLPs(self.num_heads, self.head_size, hidden, mixing)
        # Tied: one hypernetwork makes both W1 and W2 (no second module, so no duplicated weights on disk).
        self.hyper_w2 = None if self.tied else ParallelMLPs(self.num_heads, self.head_size, hidden, mixing)
        if self.position == "learned":
            self.position_table = nn.Parameter(torch.zeros(config.max_seq_len, config.hidden_size))
            nn.init.normal_(self.position_table, std=config.initializer_range)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.hypermixer_layer_norm else None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, d) -> (B, H, N, d/H)
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_size).transpose(1, 2)

    def _with_positions(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if self.position == "sinusoidal":
            return x + sinusoidal_positions(length, x.shape[-1], x.device, x.dtype)
        if self.position == "learned":
            if length > self.position_table.shape[0]:
                raise ValueError(
                    f"HyperMixing: sequence length {length} exceeds the learned position table "
                    f"({self.position_table.shape[0]}); use hypermixer_position='sinusoidal' for longer inputs"
                )
            return x + self.position_table[:length].to(x.dtype)
        return x

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, N, d) keys/values; mask: (B, N), True/1 at real tokens. Returns (B, M, d), M = N unless `query`."""
        if query is not None and self.tied:
            raise ValueError("HyperMixing: a tied module generates W1 and W2 from the same tokens; it cannot take a separate query")
        if query is None:
            query, query_mask = x, mask
        key_keep = None if mask is None else mask.to(x.dtype)[:, None, :, None]  # (B, 1, N, 1)
        query_keep = None if query_mask is None else query_mask.to(x.dtype)[:, None, :, None]

        values = self._split_heads(x)
        keys = self._split_heads(self._with_positions(x))  # X + P, computed once
        w1 = self.hyper_w1(keys)  # (B, H, N, d'/H)
        if self.tied:
            w2 = w1
        else:
            queries = keys if query is x else self._split_heads(self._with_positions(query))
            w2 = self.hyper_w2(queries)  # (B, H, M, d'/H)
        if key_keep is not None:
            values = values * key_keep
            w1 = w1 * key_keep
        if query_keep is not None:
            w2 = w2 * query_keep

        mixed = F.gelu(token_sum(w1, values))  # (B, H, d'/H, d/H): linear in N
        out = torch.matmul(w2, mixed.to(w2.dtype))  # (B, H, M, d/H)
        batch, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_size)
        return self.norm(out) if self.norm is not None else out
