"""The independent reference of `bench.quality`: Hugging Face's `BertForMaskedLM`, pretrained through
this project's trainer (`pretrain.trainer.run`, DeepSpeed) on the same shards, masks, optimizer and
schedule as our models. Only the data and the optimizer loop are shared: the forward pass and the
loss are transformers' own (its cross-entropy over the label tensor, -100 ignored).

    python -m bench.reference_bert --config cpu --set data.path=... output_dir=...   # as pretrain/main.py

Same width, depth, heads, FFN size, vocabulary, sequence length, dropout, LayerNorm epsilon and
initializer range as the `EncoderConfig` that the trainer resolves. What stays BERT's own: its code,
and its post-LN blocks (ours are pre-LN with a final LayerNorm by default). Our transformer with
`model.norm_position=post` computes the same function: given BERT's weights it gives BERT's logits and
loss (tests/test_quality.py), so a gap between it and this reference is the initial draw's, not a defect.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from hypermixer import IGNORE_INDEX, EncoderConfig
from hypermixer.heads import MaskedLMOutput

EXTRA = "hf"  # pip install -e '.[hf]'


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise SystemExit(f"bench: Hugging Face transformers is not installed: pip install -e '.[{EXTRA}]'") from None
    return transformers


def bert_config(encoder: EncoderConfig) -> Any:
    transformers = import_transformers()
    return transformers.BertConfig(
        vocab_size=encoder.vocab_size,
        hidden_size=encoder.hidden_size,
        num_hidden_layers=encoder.num_layers,
        num_attention_heads=encoder.num_heads,
        intermediate_size=encoder.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=encoder.dropout,
        attention_probs_dropout_prob=encoder.attention_dropout,
        max_position_embeddings=encoder.max_seq_len,
        type_vocab_size=max(1, encoder.type_vocab_size),
        initializer_range=encoder.initializer_range,
        layer_norm_eps=encoder.layer_norm_eps,
        pad_token_id=encoder.pad_token_id,
        tie_word_embeddings=True,
    )


class BertReference(nn.Module):
    """BertForMaskedLM behind the trainer's interface: forward(input_ids, attention_mask=, labels=) ->
    loss (BERT's own), accuracy and num_masked at the labelled positions."""

    def __init__(self, encoder: EncoderConfig) -> None:
        super().__init__()
        transformers = import_transformers()
        self.config = encoder
        self.bert = transformers.BertForMaskedLM(bert_config(encoder))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        out = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels
        )
        if labels is None:
            return MaskedLMOutput(logits=out.logits)
        selected = labels != IGNORE_INDEX
        targets = labels[selected]
        logits = out.logits[selected]
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
        return MaskedLMOutput(logits=logits, loss=out.loss, accuracy=accuracy, num_masked=int(targets.numel()))


if __name__ == "__main__":
    import_transformers()  # one line naming the extra, before any process group exists
    from pretrain.main import main

    sys.exit(main(build_model=BertReference))
