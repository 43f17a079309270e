"""Task heads on the encoder: masked-LM pretraining and sequence classification/regression."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hypermixer.config import EncoderConfig
from hypermixer.encoder import Encoder, init_weights
from hypermixer.io import PretrainedMixin

IGNORE_INDEX = -100


@dataclass
class MaskedLMOutput:
    logits: torch.Tensor  # (B, N, V) without labels; (num_masked, V) with labels
    loss: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None
    num_masked: int | None = None


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # (B, num_labels)
    loss: torch.Tensor | None = None


class ForMaskedLM(PretrainedMixin, nn.Module):
    """Encoder + BERT-style MLM head whose output projection is the input embedding matrix (tied)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.apply(lambda m: init_weights(m, config))

    def head_config(self) -> dict:
        return {}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        hidden = self.encoder(input_ids, attention_mask, token_type_ids)
        if labels is None:
            return MaskedLMOutput(logits=self._logits(hidden))
        # Project only the masked positions: ~15% of tokens, and the V-wide projection dominates the head.
        selected = labels != IGNORE_INDEX
        targets = labels[selected]
        logits = self._logits(hidden[selected])
        if targets.numel() == 0:
            zero = hidden.sum() * 0.0  # keeps every parameter in the graph for ZeRO/DDP
            return MaskedLMOutput(logits=logits, loss=zero, accuracy=zero.detach(), num_masked=0)
        loss = F.cross_entropy(logits.float(), targets)
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
        return MaskedLMOutput(logits=logits, loss=loss, accuracy=accuracy, num_masked=int(targets.numel()))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return masked_lm_logits(self, hidden)


class ForSequenceClassification(PretrainedMixin, nn.Module):
    """Encoder + pooling + classifier. num_labels == 1 means regression (mean squared error)."""

    def __init__(self, config: EncoderConfig, num_labels: int = 2) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"ForSequenceClassification: num_labels must be >= 1, got {num_labels}")
        self.config = config
        self.num_labels = num_labels
        self.encoder = Encoder(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.apply(lambda m: init_weights(m, config))

    def head_config(self) -> dict:
        return {"num_labels": self.num_labels}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        hidden = self.encoder(input_ids, attention_mask, token_type_ids)
        logits = classifier_logits(self, hidden, attention_mask, self.config.pooling)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(logits=logits, loss=loss)


# The head computations, as functions of any module holding the head's submodules under these names:
# the library's classes above and the Hugging Face wrappers (hypermixer.hf) share them.


def masked_lm_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """MLM logits from hidden states (..., d): transform, GELU, LayerNorm, then the tied embedding matrix."""
    h = head.transform_norm(F.gelu(head.transform(hidden)))
    return F.linear(h, head.encoder.embeddings.token.weight, head.output_bias)


def classifier_logits(
    head: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str
) -> torch.Tensor:
    """Classifier logits (B, num_labels): pool (mean over real tokens, or the first token), tanh pooler, classifier."""
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif attention_mask is None:
        pooled = hidden.mean(dim=1)
    else:
        keep = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
    return head.classifier(head.dropout(torch.tanh(head.pooler(pooled))))
