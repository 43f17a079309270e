"""Where a training step's memory goes: what autograd keeps for backward, per component of a block.

    python -m bench.activations                       # hypermixer and transformer, N = 1024, 16,384 tokens
    python -m bench.activations --length 4096

One training-mode forward of ForMaskedLM (d=256, 4 layers, dropout 0, attention dropout 0: SDPA's fused
path) under torch.autograd.graph.saved_tensors_hooks: every tensor saved for backward is counted once (by
storage; parameters excluded) and charged to the module running when it was saved. Figures are per layer
and per token, in units of one d-wide fp32 vector (so "5.0" = five N x d tensors per layer), plus the total
in MiB. It counts stored activations, not temporaries; bench.models measures the whole step's peak.
"""

from __future__ import annotations

import argparse

COMPONENTS = ["mixer_norm", "mixer", "mlp_norm", "mlp"]


def saved_per_component(mixer: str, length: int, tokens: int, hidden_size: int, num_layers: int) -> dict[str, float]:
    import torch

    from hypermixer import EncoderConfig, ForMaskedLM

    torch.manual_seed(0)
    config = EncoderConfig(
        vocab_size=8192,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=4,
        intermediate_size=4 * hidden_size,
        mixer=mixer,
        max_seq_len=length,
        dropout=0.0,
        attention_dropout=0.0,
    )
    model = ForMaskedLM(config).train()
    ids = torch.randint(5, config.vocab_size, (max(1, tokens // length), length))
    labels = torch.where(torch.rand(ids.shape) < 0.15, ids, torch.full_like(ids, -100))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    current = ["rest (embeddings, final norm, MLM head)"]
    saved: dict[str, int] = {}

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen and key not in params:
            seen.add(key)
            saved[current[0]] = saved.get(current[0], 0) + tensor.untyped_storage().nbytes()
        return tensor

    for block in model.encoder.blocks:
        for name in COMPONENTS:
            module = getattr(block, name)
            module.register_forward_pre_hook(lambda *_, n=name: current.__setitem__(0, n))
            module.register_forward_hook(lambda *_: current.__setitem__(0, "rest (embeddings, final norm, MLM head)"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=labels)  # the forward is the point: its saved tensors pass through `pack`
    unit = ids.numel() * hidden_size * 4  # one N x d fp32 tensor per sequence, over the batch
    out = {name: saved.get(name, 0) / unit / num_layers for name in COMPONENTS}
    out["rest (embeddings, final norm, MLM head)"] = saved.get("rest (embeddings, final norm, MLM head)", 0) / unit
    out["total MiB"] = sum(saved.values()) / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    args = parser.parse_args(argv)
    rows = {
        m: saved_per_component(m, args.length, args.tokens, args.hidden_size, args.num_layers)
        for m in ("transformer", "hypermixer")
    }
    print(
        f"Saved for backward, N={args.length}, {args.tokens:,} tokens, d={args.hidden_size}, "
        f"{args.num_layers} layers, fp32 (N x d tensors per layer; 'rest': whole model)\n"
    )
    names = list(rows["transformer"])
    print("| component | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r[name]:,.1f}" for r in rows.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
