# Generated from hypermixer/hf/modeling_hypermixer.py by hypermixer.hf.release when this release was written; do not edit.
"""Hugging Face models over the library's modules: HyperMixerModel, HyperMixerForMaskedLM and
HyperMixerForSequenceClassification, for every mixer (hypermixer, transformer, mlpmixer, fnet).

Each wrapper holds exactly the submodules of the library's class, under the same names (`encoder.*`,
`transform.*`, `output_bias`, `pooler.*`, `classifier.*`), and computes through the library's own
functions, so one model.safetensors serves both `hypermixer`'s from_pretrained and the Auto classes,
and the logits are the library's. What Hugging Face adds: its output classes, `labels` -> `loss` by
`problem_type` (regression: mean squared error; single-label: cross-entropy; multi-label: BCE), the
per-layer `hidden_states`, and its loading (a classifier built from a masked-LM release takes the
encoder and starts a fresh head, with Hugging Face's usual warning).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput

from .hypermixer_encoder import Encoder, init_weights
from .hypermixer_heads import IGNORE_INDEX, ForMaskedLM, ForSequenceClassification, classifier_logits, masked_lm_logits
from .configuration_hypermixer import HyperMixerConfig
from .hypermixer_hf_release import missing_tokenizer_files, write_release_code
from .hypermixer_mixers_hypermixing import HyperMixing, ParallelMLPs

logger = logging.getLogger(__name__)


class HyperMixerPreTrainedModel(PreTrainedModel):
    config_class = HyperMixerConfig
    base_model_prefix = "encoder"  # every class holds the encoder as `encoder`: checkpoint keys never change
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # Encoder.gradient_checkpointing
    _no_split_modules = ["Block"]
    encoder: Encoder  # adopted from the library model (`_adopt`); declared for type checkers

    def _adopt(self, library_model: nn.Module) -> None:
        """Take the library model's submodules and parameters as this model's own, under the same names."""
        for name, module in library_model.named_children():
            self.add_module(name, module)
        for name, param in library_model.named_parameters(recurse=False):
            self.register_parameter(name, param)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The library's initialisation (BERT's for Linear/Embedding/LayerNorm, Xavier for hypernetworks),
        for weights a checkpoint did not provide (a new head)."""
        config = self.config.encoder_config()
        if isinstance(module, ParallelMLPs):
            heads, in_size, hidden = module.fc1_weight.shape
            with torch.device(module.fc1_weight.device):
                fresh = ParallelMLPs(heads, in_size, hidden, module.fc2_weight.shape[-1])
            for name, param in module.named_parameters(recurse=False):
                init.copy_(param, getattr(fresh, name))
        elif isinstance(module, HyperMixing):
            if getattr(module, "position_table", None) is not None:
                init.normal_(module.position_table, std=config.initializer_range)
        elif module is self:
            bias = getattr(self, "output_bias", None)
            if isinstance(bias, nn.Parameter):
                init.zeros_(bias)
        else:
            init_weights(module, config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embeddings.token

    def set_input_embeddings(self, value: nn.Module) -> None:
        if not isinstance(value, nn.Embedding):
            raise TypeError(f"set_input_embeddings: expected an nn.Embedding, got {type(value).__name__}")
        self.encoder.embeddings.token = value

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Hugging Face's from_pretrained; a local folder without tokenizer files gets a one-line warning
        naming the missing file (AutoTokenizer and pipeline() then fail with Hugging Face's message)."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        missing = missing_tokenizer_files(pretrained_model_name_or_path)
        if missing:
            logger.warning(
                "%s: no %s, so AutoTokenizer and pipeline() cannot read a tokenizer from this folder",
                pretrained_model_name_or_path,
                missing[0],
            )
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Hugging Face's save_pretrained, plus the code files that config.json's auto_map names."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", args[0] if args else True):
            write_release_code(save_directory)
        return result

    def _encode(self, input_ids, attention_mask, token_type_ids, output_hidden_states):
        """(last hidden state, hidden states or None): the embeddings' output, each block's output but the
        last, then the final (normalised) output, as Hugging Face's pre-norm models report them."""
        if input_ids is None:
            raise ValueError(f"{type(self).__name__}: input_ids is required (inputs_embeds is not supported)")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if not output_hidden_states:
            return self.encoder(input_ids, attention_mask, token_type_ids), None
        states: dict[int, torch.Tensor] = {}

        def keep(index):
            return lambda module, inputs, output: states.__setitem__(index, output)

        encoder = self.encoder
        hooks = [encoder.embeddings.register_forward_hook(keep(0))]
        hooks += [block.register_forward_hook(keep(i)) for i, block in enumerate(encoder.blocks[:-1], start=1)]
        try:
            last = encoder(input_ids, attention_mask, token_type_ids)
        finally:
            for hook in hooks:
                hook.remove()
        return last, tuple(states[i] for i in range(len(encoder.blocks))) + (last,)

    def _return_dict(self, return_dict):
        return self.config.return_dict if return_dict is None else return_dict


class HyperMixerModel(HyperMixerPreTrainedModel):
    """The bare encoder: last_hidden_state (B, N, d)."""

    def __init__(self, config: HyperMixerConfig) -> None:
        super().__init__(config)
        self.encoder = Encoder(config.encoder_config())
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ):
        last, hidden_states = self._encode(input_ids, attention_mask, token_type_ids, output_hidden_states)
        out = BaseModelOutput(last_hidden_state=last, hidden_states=hidden_states)
        return out if self._return_dict(return_dict) else out.to_tuple()


class HyperMixerForMaskedLM(HyperMixerPreTrainedModel):
    """The library's ForMaskedLM (output projection tied to the input embeddings): logits (B, N, V)."""

    def __init__(self, config: HyperMixerConfig) -> None:
        super().__init__(config)
        self._adopt(ForMaskedLM(config.encoder_config()))
        self.post_init()

    def get_output_embeddings(self):
        return None  # the projection *is* the input embedding matrix (F.linear on it), nothing to tie

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ):
        hidden, hidden_states = self._encode(input_ids, attention_mask, token_type_ids, output_hidden_states)
        logits = masked_lm_logits(self, hidden)
        loss = None
        if labels is not None:
            flat = labels.reshape(-1)
            if bool((flat != IGNORE_INDEX).any()):
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE_INDEX)
            else:
                loss = logits.sum() * 0.0  # nothing masked: zero, with every parameter in the graph
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden_states)
        return out if self._return_dict(return_dict) else out.to_tuple()


class HyperMixerForSequenceClassification(HyperMixerPreTrainedModel):
    """The library's ForSequenceClassification: pooled (mean or first token) -> tanh pooler -> classifier."""

    def __init__(self, config: HyperMixerConfig) -> None:
        super().__init__(config)
        self.num_labels = len(config.id2label or {})  # Hugging Face's definition of num_labels
        self._adopt(ForSequenceClassification(config.encoder_config(), num_labels=self.num_labels))
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ):
        hidden, hidden_states = self._encode(input_ids, attention_mask, token_type_ids, output_hidden_states)
        logits = classifier_logits(self, hidden, attention_mask, self.config.pooling)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels)
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)
        return out if self._return_dict(return_dict) else out.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.problem_type is None:  # as Hugging Face's classifiers decide it, once
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(-1).float(), labels.reshape(-1).float())
            return F.mse_loss(logits.float(), labels.float())
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.reshape(-1, self.num_labels).float(), labels.reshape(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


__all__ = [
    "HyperMixerPreTrainedModel",
    "HyperMixerModel",
    "HyperMixerForMaskedLM",
    "HyperMixerForSequenceClassification",
]
