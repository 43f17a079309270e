# Generated from hypermixer/heads.py by hypermixer.hf.release when this release was written; do not edit.
"""Task heads on the encoder: masked-LM pretraining and sequence classification/regression."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hypermixer_config import EncoderConfig
from .hypermixer_encoder import Encoder, init_weights
from .hypermixer_io import PretrainedMixin

IGNORE_INDEX = -100


@dataclass
class MaskedLMOutput:
    logits: torch.Tensor  # (B, N, V) without labels; (num_masked, V) with labels; (B, k, V) with k slots
    loss: torch.Tensor | None = None  # mean over the predicted tokens
    accuracy: torch.Tensor | None = None
    num_masked: int | torch.Tensor | None = None  # a 0-d tensor with static slots (read it only when needed)


def max_predictions_per_seq(seq_len: int, mask_prob: float, miss: float = 1e-12) -> int:
    """Static prediction slots per sequence: the smallest k with P(Binomial(seq_len, mask_prob) > k) < miss.

    Masking selects each token independently with probability `mask_prob` (special tokens never), so
    the selected count of a sequence is at most Binomial(seq_len, mask_prob); for 128 tokens at 15% this
    gives 52 slots (mean 19.2), for 512 tokens 139. The tail is summed exactly, in log space."""
    if seq_len <= 0 or not 0.0 < mask_prob < 1.0:
        raise ValueError(f"max_predictions_per_seq: need seq_len > 0 and 0 < mask_prob < 1, got {seq_len}, {mask_prob}")
    log_p, log_q = math.log(mask_prob), math.log1p(-mask_prob)

    def log_pmf(i: int) -> float:
        return (
            math.lgamma(seq_len + 1)
            - math.lgamma(i + 1)
            - math.lgamma(seq_len - i + 1)
            + i * log_p
            + (seq_len - i) * log_q
        )

    tail = 0.0  # P(count > k), summed from the top down
    for k in range(seq_len, -1, -1):
        if tail >= miss:
            return min(seq_len, k + 1)
        tail += math.exp(log_pmf(k))
    return seq_len


def prediction_slots(labels: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets), each (B, slots): the first `slots` labelled positions of each row in order,
    then unlabelled ones whose target is IGNORE_INDEX. A row with more than `slots` labels keeps its
    first `slots` (see max_predictions_per_seq for how rare that is). Static shapes, no host read."""
    length = labels.shape[1]
    slots = min(slots, length)
    order = torch.arange(length, device=labels.device)
    key = (labels == IGNORE_INDEX).to(order.dtype) * length + order  # labelled first, each group in order
    positions = torch.topk(key, slots, dim=1, largest=False, sorted=True).indices
    return positions, labels.gather(1, positions)


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # (B, num_labels)
    loss: torch.Tensor | None = None


class ForMaskedLM(PretrainedMixin, nn.Module):
    """Encoder + BERT-style MLM head whose output projection is the input embedding matrix (tied).

    `max_predictions` (a run-time setting, not saved): None projects exactly the labelled positions
    (their number sets the logits' shape, and reading it is a host sync); an int k projects k static
    slots per sequence (`prediction_slots`), as BERT's max_predictions_per_seq: shapes no longer depend
    on the data, so torch.compile(fullgraph=True) and CUDA graphs can capture the step. Both give the
    same loss and accuracy whenever no sequence has more than k labels."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.max_predictions: int | None = None
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
        if self.max_predictions is not None:
            return self._static_slots_loss(hidden, labels, self.max_predictions)
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

    def _static_slots_loss(self, hidden: torch.Tensor, labels: torch.Tensor, slots: int) -> MaskedLMOutput:
        positions, targets = prediction_slots(labels, slots)
        picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, k, d)
        logits = self._logits(picked)
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        denominator = count.clamp(min=1).float()
        # Sum over the real targets, then divide: the mean of the dynamic path (padding slots add 0). With
        # no target at all the loss is 0 and still reaches every parameter (ZeRO/DDP need them in the graph).
        loss = (
            F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            / denominator
        )
        correct = ((logits.argmax(dim=-1) == targets) & valid).sum()
        return MaskedLMOutput(logits=logits, loss=loss, accuracy=correct.float() / denominator, num_masked=count)

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


# The head computations, as functions of any module holding the head's submodules under these names
# (duck-typed, hence `head: Any`): the library's classes above and the Hugging Face wrappers share them.


def masked_lm_logits(head: Any, hidden: torch.Tensor) -> torch.Tensor:
    """MLM logits from hidden states (..., d): transform, GELU, LayerNorm, then the tied embedding matrix."""
    h = head.transform_norm(F.gelu(head.transform(hidden)))
    return F.linear(h, head.encoder.embeddings.token.weight, head.output_bias)


def classifier_logits(
    head: Any, hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str
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
