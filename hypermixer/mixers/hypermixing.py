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
output LayerNorm). tests/test_models.py checks its forward and gradients against a plain per-head reference.
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
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


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


class _HyperMixingFunction(torch.autograd.Function):
    """TM(X) = W2 · GELU(W1ᵀ · X) with W1 = h1(X + P), W2 = h2(Q + P_Q), keeping for backward only the inputs and
    the small (d'/H x d/H) token sums: every N-sized intermediate (X + P, the hypernetworks' hidden layers, W1,
    W2) is recomputed in backward, one layer at a time. Autograd's own graph of the same ops keeps ~10 N x d
    tensors per layer, which made HyperMixer's training step use more memory than attention's.

    Inputs: x (B, N, d); query (B, M, d) or None (self-mixing: W2 comes from X + P); key/query positions
    (N, d) / (M, d) or None; key/query keep (B, N) / (B, M), 1 at real tokens, or None; h1's four parameters,
    then h2's (None for a tied module: W2 = W1). All already in one compute dtype; autocast off.
    """

    @staticmethod
    def forward(ctx, num_heads, x, query, key_pos, query_pos, key_keep, query_keep, *params):
        h1, h2 = tuple(params[:4]), (None if params[4] is None else tuple(params[4:]))
        keys, queries = _HyperMixingFunction._keys_and_queries(num_heads, x, query, key_pos, query_pos)
        # W1's side first, then W2's, so that only one side's N-sized tensors are alive at a time
        w1 = _masked(_hypernet(keys, h1)[2], key_keep)
        token_mix = token_sum(w1, _masked(_heads(x, num_heads), key_keep))  # (B, H, d'/H, d/H): linear in N
        del w1
        w2 = _masked(_hypernet(queries, h1 if h2 is None else h2)[2], query_keep)
        out = torch.matmul(w2, F.gelu(token_mix).to(w2.dtype))  # (B, H, M, d/H)
        ctx.num_heads, ctx.tied = num_heads, h2 is None
        ctx.save_for_backward(x, query, key_pos, query_pos, key_keep, query_keep, token_mix, *params[:4], *(h2 or ()))
        return _merge_heads(out)

    @staticmethod
    def _keys_and_queries(num_heads, x, query, key_pos, query_pos):
        """X + P and Q + P_Q split into heads (the queries are the keys when mixing a sequence with itself)."""
        keys = _heads(x if key_pos is None else x + key_pos, num_heads)
        if query is None:
            return keys, keys
        return keys, _heads(query if query_pos is None else query + query_pos, num_heads)

    @staticmethod
    def backward(ctx, grad_output):
        x, query, key_pos, query_pos, key_keep, query_keep, token_mix, *params = ctx.saved_tensors
        heads = ctx.num_heads
        h1 = tuple(params[:4])
        h2 = None if ctx.tied else tuple(params[4:])
        with torch.no_grad():
            keys, queries = _HyperMixingFunction._keys_and_queries(heads, x, query, key_pos, query_pos)
            # W2's side: recompute it, take its gradients, and free it before W1's side is recomputed.
            pre2, hidden2, w2_raw = _hypernet(queries, h1 if h2 is None else h2)
            w2 = _masked(w2_raw, query_keep)
            grad_out = _heads(grad_output.to(w2.dtype), heads)  # (B, H, M, d/H)
            grad_mixed = token_sum(w2, grad_out)  # W2ᵀ·dOut, a sum over the M tokens: fp32 like the forward's
            del w2
            # W2's gradient comes from the output's, so it needs the query mask.
            grad_w2 = _masked(
                torch.matmul(grad_out, F.gelu(token_mix).to(grad_out.dtype).transpose(-1, -2)), query_keep
            )
            del grad_out
            grad_queries: torch.Tensor | None = None
            grads2: list[torch.Tensor] = []
            if h2 is None:  # tied: W2 = W1 (self-mixing only); its recomputation serves W1's side too
                pre1, hidden1, w1_raw = pre2, hidden2, w2_raw
            else:
                del w2_raw
                grad_queries, grads2 = _hypernet_backward(queries, pre2, hidden2, grad_w2, h2)
                del grad_w2
            del pre2, hidden2
            grad_token_mix = torch.ops.aten.gelu_backward(grad_mixed, token_mix).to(x.dtype)
            # W1's side. W1 and X were masked, so grad_w1 = X·dSᵀ and grad_values = W1·dS are already zero at
            # padded keys.
            if h2 is not None:
                pre1, hidden1, w1_raw = _hypernet(keys, h1)
            values = _masked(_heads(x, heads), key_keep)
            grad_w1 = torch.matmul(values, grad_token_mix.transpose(-1, -2))  # (B, H, N, d'/H)
            del values
            grad_values = torch.matmul(_masked(w1_raw, key_keep), grad_token_mix)  # (B, H, N, d/H)
            del w1_raw
            if h2 is None:
                grad_w1 = grad_w1 + grad_w2
                del grad_w2
            grad_keys, grads1 = _hypernet_backward(keys, pre1, hidden1, grad_w1, h1)
            del pre1, hidden1, grad_w1
            if grad_queries is not None and query is None:  # self-mixing: the queries are the keys
                grad_keys, grad_queries = grad_keys + grad_queries, None
            grad_x = _merge_heads(grad_values + grad_keys)
            grad_key_pos = _merge_heads(grad_keys).sum(0) if ctx.needs_input_grad[3] else None
            grad_query = grad_query_pos = None
            if grad_queries is not None:
                grad_query = _merge_heads(grad_queries)
                grad_query_pos = grad_query.sum(0) if ctx.needs_input_grad[4] else None
        param_grads: list[torch.Tensor | None] = [g.to(p.dtype) for g, p in zip(grads1 + grads2, params)]
        if h2 is None:
            param_grads += [None] * 4
        return (None, grad_x.to(x.dtype), grad_query, grad_key_pos, grad_query_pos, None, None, *param_grads)


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
