# Generated from hypermixer/mixers/hypermixing.py by hypermixer.hf.release when this release was written; do not edit.
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

Memory: the layer is one autograd function with a hand-written backward (`_HyperMixingFunction`) that keeps
only its input X and the small per-head token sums for backward, and recomputes X + P, the hypernetworks and
W1, W2 there (about a third more of the layer's cheap forward). Autograd's graph of the same ops kept ~10
N x d tensors per layer, more than attention's fused SDPA keeps (~5); now it keeps ~2 (X, and the input of the
output LayerNorm). Forward and backward run block by block of at most TOKENS_PER_BLOCK tokens, so the
recomputed intermediates never exist for the whole batch at once. tests/test_models.py checks forward and
gradients against a plain per-head reference, in one block and in many.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .hypermixer_config import EncoderConfig


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
    # Built outside inference mode even when first asked for under it (an evaluation): an inference tensor
    # could not be saved for backward by a later training step that reuses the cached table.
    with torch.inference_mode(False):
        work = torch.promote_types(dtype, torch.float32)  # at least fp32, even for a bf16 model
        position = torch.arange(length, device=device, dtype=work).unsqueeze(1)
        inv_freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=work) * (-math.log(10000.0) / dim))
        table = torch.zeros(length, dim, device=device, dtype=work)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
        return table.to(dtype)


def token_sum(w1: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """W1ᵀ·X, summed over the N tokens (axis -2) in at least fp32 whatever the inputs' dtype: in bf16 or fp16
    a sum over 16k tokens would lose most of its bits. Unchanged for fp32/fp64 inputs. Call it with autocast
    off (HyperMixing does), or autocast would cast the fp32 operands back down."""
    work = torch.promote_types(torch.promote_types(w1.dtype, values.dtype), torch.float32)
    return torch.matmul(w1.transpose(-1, -2).to(work), values.to(work))


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:  # (B, N, d) -> (B, H, N, d/H)
    batch, length, width = x.shape
    return x.reshape(batch, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:  # (B, H, N, d/H) -> (B, N, d)
    batch, heads, length, size = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * size)


def _hypernet(z: torch.Tensor, net: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ParallelMLPs' forward, keeping what its backward needs: returns (pre-GELU hidden, GELU hidden, output)."""
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = net
    pre = torch.matmul(z, fc1_weight) + fc1_bias
    hidden = F.gelu(pre)
    return pre, hidden, torch.matmul(hidden, fc2_weight) + fc2_bias


def _hypernet_backward(
    z: torch.Tensor, pre: torch.Tensor, hidden: torch.Tensor, grad_out: torch.Tensor, net: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Gradients of one ParallelMLPs: (d z, [d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias]). The parameter
    gradients sum over every token of every sequence: in at least fp32, like the forward's token sum."""
    fc1_weight, _, fc2_weight, _ = net
    grad_fc2_weight = token_sum(hidden, grad_out).sum(0)
    grad_fc2_bias = grad_out.sum((0, 2), keepdim=True, dtype=grad_fc2_weight.dtype)[0]
    grad_pre = torch.ops.aten.gelu_backward(torch.matmul(grad_out, fc2_weight.transpose(-1, -2)), pre)
    grad_fc1_weight = token_sum(z, grad_pre).sum(0)
    grad_fc1_bias = grad_pre.sum((0, 2), keepdim=True, dtype=grad_fc1_weight.dtype)[0]
    grad_z = torch.matmul(grad_pre, fc1_weight.transpose(-1, -2))
    return grad_z, [grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias]


def _masked(w: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:  # zero padded tokens' rows
    return w if keep is None else w * keep[:, None, :, None]


# Tokens per block for the N-sized intermediates (X + P, the hypernetworks' hidden layers, W1, W2): a block's
# are a few MB at d = 256, so they stay in cache, and the layer's transient memory no longer grows with N or
# the batch. One layer (d = 256, 4 heads, 16k tokens, forward + backward, one thread) measured against a
# single block: 3.0x less transient memory and 1.2-1.7x faster at N = 512 x 32, 8k x 2 and 32k x 1; 2,048 and
# 4,096 tokens per block were level, 1,024 no better.
TOKENS_PER_BLOCK = 2048
# On a GPU each block costs the same few dozen kernel launches per pass whatever its size, so small blocks leave
# it waiting on launches: on an H200 (bench/results/gpu_h200) the base model's HyperMixer with 2,048-token blocks
# ran at 0.18x the transformer's tokens/s. Its memory is large enough for 64k-token blocks at any width here.
GPU_TOKENS_PER_BLOCK = 65536


def token_blocks(batch: int, length: int, device_type: str = "cpu") -> list[tuple[slice, slice]]:
    """(sequences, tokens) slices covering a (batch, length) grid with at most TOKENS_PER_BLOCK tokens each
    (GPU_TOKENS_PER_BLOCK off the CPU): whole sequences grouped when they are short, one sequence cut along its
    tokens when it is long."""
    budget = TOKENS_PER_BLOCK if device_type == "cpu" else GPU_TOKENS_PER_BLOCK
    if length >= budget:
        return [
            (slice(b, b + 1), slice(s, min(s + budget, length))) for b in range(batch) for s in range(0, length, budget)
        ]
    per = max(1, budget // max(length, 1))
    return [(slice(b, min(b + per, batch)), slice(0, length)) for b in range(0, batch, per)]


def _side(tokens: torch.Tensor, pos: torch.Tensor | None, rows: slice, cols: slice, num_heads: int) -> torch.Tensor:
    """X + P (or Q + P_Q) of one block, split into heads: the hypernetworks' input."""
    block = tokens[rows, cols]
    return _heads(block if pos is None else block + pos[cols], num_heads)


def _keep_of(keep: torch.Tensor | None, rows: slice, cols: slice) -> torch.Tensor | None:
    return None if keep is None else keep[rows, cols]


def _add_into(totals: list[torch.Tensor] | None, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return grads if totals is None else [t + g for t, g in zip(totals, grads)]


class _HyperMixingFunction(torch.autograd.Function):
    """TM(X) = W2 · GELU(W1ᵀ · X) with W1 = h1(X + P), W2 = h2(Q + P_Q), computed block by block of tokens
    (`token_blocks`) and keeping for backward only the inputs and the small (d'/H x d/H) token sums. Every
    N-sized intermediate (X + P, the hypernetworks' hidden layers, W1, W2) lives for one block only, in forward
    and again in backward, where it is recomputed: W2's side in a first pass over the blocks (it yields the
    gradient of the token sum), W1's side in a second. Autograd's own graph of the same ops kept ~10 N x d
    tensors per layer, which made HyperMixer's training step use more memory than attention's.

    Inputs: x (B, N, d); query (B, M, d) or None (self-mixing: W2 comes from X + P); key/query positions
    (N, d) / (M, d) or None; key/query keep (B, N) / (B, M), 1 at real tokens, or None; h1's four parameters,
    then h2's (None for a tied module: W2 = W1). All already in one compute dtype; autocast off.
    """

    @staticmethod
    def forward(ctx, num_heads, x, query, key_pos, query_pos, key_keep, query_keep, *params):
        h1, h2 = tuple(params[:4]), (None if params[4] is None else tuple(params[4:]))
        batch, width = x.shape[0], x.shape[-1]
        queries, queries_pos = (x, key_pos) if query is None else (query, query_pos)
        token_mix = None  # (B, H, d'/H, d/H), at least fp32: linear in N
        for rows, cols in token_blocks(batch, x.shape[1], x.device.type):
            keep = _keep_of(key_keep, rows, cols)
            w1 = _masked(_hypernet(_side(x, key_pos, rows, cols, num_heads), h1)[2], keep)
            part = token_sum(w1, _masked(_heads(x[rows, cols], num_heads), keep))
            if token_mix is None:
                token_mix = part.new_zeros((batch, *part.shape[1:]))
            token_mix[rows] += part
        assert token_mix is not None
        mixing = F.gelu(token_mix).to(x.dtype)
        out = x.new_empty((batch, queries.shape[1], width))
        for rows, cols in token_blocks(batch, queries.shape[1], x.device.type):
            w2 = _hypernet(_side(queries, queries_pos, rows, cols, num_heads), h1 if h2 is None else h2)[2]
            w2 = _masked(w2, _keep_of(query_keep, rows, cols))
            out[rows, cols] = _merge_heads(torch.matmul(w2, mixing[rows]))
        ctx.num_heads, ctx.tied = num_heads, h2 is None
        ctx.save_for_backward(x, query, key_pos, query_pos, key_keep, query_keep, token_mix, *params[:4], *(h2 or ()))
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, query, key_pos, query_pos, key_keep, query_keep, token_mix, *params = ctx.saved_tensors
        heads, dtype = ctx.num_heads, x.dtype
        h1 = tuple(params[:4])
        h2 = None if ctx.tied else tuple(params[4:])
        batch = x.shape[0]
        queries, queries_pos = (x, key_pos) if query is None else (query, query_pos)
        want_key_pos = key_pos is not None and ctx.needs_input_grad[3]
        with torch.no_grad():
            mixing = F.gelu(token_mix).to(dtype)
            grad_x = torch.zeros_like(x)
            grad_query = None if query is None else torch.zeros_like(query)
            grad_key_pos = token_mix.new_zeros(key_pos.shape) if want_key_pos else None
            grad_mixed = torch.zeros_like(token_mix)
            grads1: list[torch.Tensor] | None = None
            grads2: list[torch.Tensor] | None = None
            # Pass 1, W2's side: W2ᵀ·dOut summed over the query tokens (fp32, like the forward's token sum)
            # and, untied, h2's gradients. W2's gradient comes from the output's, so it needs the query mask.
            for rows, cols in token_blocks(batch, queries.shape[1], x.device.type):
                side = _side(queries, queries_pos, rows, cols, heads)
                keep = _keep_of(query_keep, rows, cols)
                pre2, hidden2, w2 = _hypernet(side, h1 if h2 is None else h2)
                grad_out = _heads(grad_output[rows, cols].to(dtype), heads)
                grad_mixed[rows] += token_sum(_masked(w2, keep), grad_out)
                if h2 is None:  # tied: W2 = W1, its gradient joins W1's in pass 2
                    continue
                grad_w2 = _masked(torch.matmul(grad_out, mixing[rows].transpose(-1, -2)), keep)
                grad_side, grads = _hypernet_backward(side, pre2, hidden2, grad_w2, h2)
                grads2 = _add_into(grads2, grads)
                target = grad_x if grad_query is None else grad_query
                target[rows, cols] += _merge_heads(grad_side)
                if grad_key_pos is not None and query is None:  # self-mixing: the queries' positions are P
                    grad_key_pos[cols] += _merge_heads(grad_side.sum(0, keepdim=True))[0]  # sum first: 1/b the copy
            grad_token_mix = torch.ops.aten.gelu_backward(grad_mixed, token_mix).to(dtype)
            del grad_mixed
            # Pass 2, W1's side. W1 and X were masked, so X·dSᵀ and W1·dS are already zero at padded keys.
            for rows, cols in token_blocks(batch, x.shape[1], x.device.type):
                side = _side(x, key_pos, rows, cols, heads)
                keep = _keep_of(key_keep, rows, cols)
                pre1, hidden1, w1 = _hypernet(side, h1)
                values = _masked(_heads(x[rows, cols], heads), keep)
                grad_w1 = torch.matmul(values, grad_token_mix[rows].transpose(-1, -2))  # (b, H, n, d'/H)
                grad_values = torch.matmul(_masked(w1, keep), grad_token_mix[rows])  # (b, H, n, d/H)
                if h2 is None:
                    grad_out = _heads(grad_output[rows, cols].to(dtype), heads)
                    grad_w1 = grad_w1 + _masked(torch.matmul(grad_out, mixing[rows].transpose(-1, -2)), keep)
                grad_side, grads = _hypernet_backward(side, pre1, hidden1, grad_w1, h1)
                grads1 = _add_into(grads1, grads)
                grad_x[rows, cols] += _merge_heads(grad_values + grad_side)
                if grad_key_pos is not None:
                    grad_key_pos[cols] += _merge_heads(grad_side.sum(0, keepdim=True))[0]  # sum first: 1/b the copy
        assert grads1 is not None
        param_grads: list[torch.Tensor | None] = [g.to(p.dtype) for g, p in zip(grads1 + (grads2 or []), params)]
        if h2 is None:
            param_grads += [None] * 4
        grad_query_pos = None
        if grad_query is not None and query_pos is not None and ctx.needs_input_grad[4]:
            grad_query_pos = grad_query.sum(0)
        if grad_key_pos is not None:
            grad_key_pos = grad_key_pos.to(key_pos.dtype)
        return (None, grad_x, grad_query, grad_key_pos, grad_query_pos, None, None, *param_grads)


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
        # None resolves to hidden_size in EncoderConfig.__post_init__; `or` says so to a type checker too.
        hidden = (config.hypermixer_hypernet_hidden_size or config.hidden_size) // config.num_heads
        mixing = (config.hypermixer_token_mixing_size or config.hidden_size) // config.num_heads
        self.hyper_w1 = ParallelMLPs(self.num_heads, self.head_size, hidden, mixing)
        # Tied: one hypernetwork makes both W1 and W2 (no second module, so no duplicated weights on disk).
        self.hyper_w2 = None if self.tied else ParallelMLPs(self.num_heads, self.head_size, hidden, mixing)
        if self.position == "learned":
            self.position_table = nn.Parameter(torch.zeros(config.max_seq_len, config.hidden_size))
            nn.init.normal_(self.position_table, std=config.initializer_range)
        self.norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.hypermixer_layer_norm else None
        )

    def _positions(self, length: int, x: torch.Tensor) -> torch.Tensor | None:
        """P for X + P: (length, d), or None for hypermixer_position='none'."""
        if self.position == "sinusoidal":
            return sinusoidal_positions(length, x.shape[-1], x.device, x.dtype)
        if self.position == "learned":
            if length > self.position_table.shape[0]:
                raise ValueError(
                    f"HyperMixing: sequence length {length} exceeds the learned position table "
                    f"({self.position_table.shape[0]}); use hypermixer_position='sinusoidal' for longer inputs"
                )
            return self.position_table[:length]
        return None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        query: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, N, d) keys/values; mask: (B, N), True/1 at real tokens. Returns (B, M, d), M = N unless `query`."""
        if query is not None and self.tied:
            raise ValueError(
                "HyperMixing: a tied module generates W1 and W2 from the same tokens; it cannot take a separate query"
            )
        if query is None:
            query_mask = mask
        # One compute dtype for everything inside (autocast's, when it is on), and autocast off in there, so
        # that the token sums stay in fp32 and backward recomputes exactly what forward computed.
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        h1 = [
            p.to(dtype)
            for p in (
                self.hyper_w1.fc1_weight,
                self.hyper_w1.fc1_bias,
                self.hyper_w1.fc2_weight,
                self.hyper_w1.fc2_bias,
            )
        ]
        w2_net = self.hyper_w2
        h2 = (
            [None] * 4
            if w2_net is None
            else [p.to(dtype) for p in (w2_net.fc1_weight, w2_net.fc1_bias, w2_net.fc2_weight, w2_net.fc2_bias)]
        )
        key_pos = self._positions(x.shape[1], x)
        query_pos = None if query is None else self._positions(query.shape[1], query)
        with torch.autocast(device, enabled=False):
            out = _HyperMixingFunction.apply(
                self.num_heads,
                x.to(dtype),
                None if query is None else query.to(dtype),
                None if key_pos is None else key_pos.to(dtype),
                None if query_pos is None else query_pos.to(dtype),
                None if mask is None else mask.to(dtype),
                None if query_mask is None else query_mask.to(dtype),
                *h1,
                *h2,
            )
        return self.norm(out) if self.norm is not None else out
