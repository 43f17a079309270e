"""A release loaded for fine-tuning or prediction, and how batches are fed to it.

Padding: hypermixer, transformer and mlpmixer are padding-invariant (padded positions are masked
out of the mixing and of the mean pooling; mlpmixer slices its max_seq_len-wide weights to the
batch's length), so each batch is padded only to its longest row. FNet is not: its Fourier
transform along the sequence changes with the amount of padding, so FNet inputs are always padded
to the fixed max length, which makes a prediction independent of the rest of its batch.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from common.files import sha256_file
from finetune.data import Encoded, Examples, batches, encode, load_tokenizer
from finetune.errors import FinetuneError
from finetune.positions import extend_positions as extend
from hypermixer import EncoderConfig, ForSequenceClassification, read_release_config

FIXED_LENGTH_MIXERS = ("fnet",)


@dataclass
class Runner:
    model: ForSequenceClassification
    tokenizer: object  # tokenizers.Tokenizer
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None: fp32
    max_len: int
    pad_to: int | None  # fixed length (FNet) or None: pad each batch to its longest row
    windows: bool = False  # long inputs split into windows (their predictions pooled), not truncated

    @property
    def config(self) -> EncoderConfig:
        return self.model.config

    @property
    def regression(self) -> bool:
        return self.model.num_labels == 1

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def encode(self, examples: Examples) -> Encoded:
        return encode(self.tokenizer, examples, self.regression, windows=self.windows)

    def batches(self, data: Encoded, batch_size: int, order: torch.Tensor | None = None):
        return batches(data, batch_size, self.config.pad_token_id, order, self.pad_to)

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's keyword arguments on the device. Segment ids only when the encoder has
        segment embeddings for both segments (type_vocab_size >= 2)."""
        keep = ("input_ids", "attention_mask", "labels") + (
            ("token_type_ids",) if self.config.type_vocab_size >= 2 else ()
        )
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in keep}

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.inference_mode()
    def predict(self, data: Encoded, batch_size: int) -> torch.Tensor:
        """Label ids (classification) or scores (regression), one per document in the order of `data`,
        on the CPU. A document in windows gets the mean of its windows' probabilities (or scores)."""
        self.model.eval()
        out = torch.empty(len(data), self.model.num_labels, dtype=torch.float32)
        for rows, batch in self.batches(data, batch_size):
            inputs = self.inputs(batch)
            inputs.pop("labels", None)
            with self.autocast():
                logits = self.model(**inputs).logits.float()
            out[rows] = (logits if self.regression else logits.softmax(dim=-1)).cpu()
        if data.documents is not None:
            pooled = torch.zeros(data.num_documents, out.shape[1]).index_add_(0, data.documents, out)
            out = pooled / torch.bincount(data.documents, minlength=data.num_documents)[:, None]
        return out[:, 0] if self.regression else out.argmax(dim=-1)


def load(
    release: str | Path,
    num_labels: int,
    from_scratch: bool = False,
    max_seq_len: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    extend_positions: str | None = None,
    long_inputs: str = "truncate",
    window_stride: int | None = None,
    dropout: float | None = None,
) -> Runner:
    """A classifier from a release: the encoder's weights from the release and a new head (or all
    weights, for a fine-tuned model folder with the same head), or random weights with
    `from_scratch`. Seed torch before calling: the head's (or everything's) initialisation draws.
    A max_seq_len beyond the release's needs `extend_positions` (finetune.positions), except from
    scratch, where the encoder is simply built longer. dropout: the hidden dropout to fine-tune with
    (None: the release's)."""
    try:
        encoder_config = read_release_config(release)["encoder"]
        max_len = max_seq_len or encoder_config.max_seq_len
        longer = max_len > encoder_config.max_seq_len
        if longer and not from_scratch and extend_positions is None:
            raise FinetuneError(
                f"max_seq_len {max_len} exceeds the release's max_seq_len {encoder_config.max_seq_len} ({release}); "
                f"to fine-tune at {max_len}, extend its position embeddings with --extend-positions copy "
                "(or interpolate)"
            )
        if from_scratch:
            config = encoder_config.replace(max_seq_len=max_len) if longer else encoder_config
            model = ForSequenceClassification(config, num_labels=num_labels)
        else:
            model = ForSequenceClassification.from_pretrained(release, num_labels=num_labels)
            if longer:
                extend(model, max_len, extend_positions)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise FinetuneError(f"{release}: cannot load the model ({str(err).splitlines()[0]})") from None
    if dropout is not None:
        set_dropout(model, dropout)
    tokenizer = load_tokenizer(release, max_len)
    windows = long_inputs == "windows"
    if windows:
        content = max_len - tokenizer.num_special_tokens_to_add(False)  # a window's text tokens
        stride = window_stride or content
        if not 1 <= stride <= content:
            raise FinetuneError(
                f"--window-stride {stride}: must be between 1 and {content} "
                f"(max_seq_len {max_len} less the special tokens)"
            )
        # The tokenizer's overflowing pieces are the windows; its `stride` is their overlap.
        tokenizer.enable_truncation(max_length=max_len, stride=content - stride)
    if tokenizer.get_vocab_size() > encoder_config.vocab_size:
        raise FinetuneError(
            f"{release}: tokenizer.json has {tokenizer.get_vocab_size()} tokens, "
            f"more than the model's vocab_size {encoder_config.vocab_size}"
        )
    torch_device = resolve_device(device)
    model.to(torch_device)
    pad_to = max_len if encoder_config.mixer in FIXED_LENGTH_MIXERS else None
    return Runner(model, tokenizer, torch_device, resolve_precision(precision, torch_device), max_len, pad_to, windows)


def release_digest(release: str, from_scratch: bool) -> str | None:
    """sha256 of the weights a pretrained run starts from; None from random weights, or for a release that is
    not a local folder. A run records it, so that a sweep never takes a run finished from other weights (a
    release exported again into the same folder) for one from the weights there now."""
    weights = Path(release) / "model.safetensors"
    if from_scratch or not weights.is_file():
        return None
    stat = weights.stat()
    return _digest(str(weights.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _digest(path: str, mtime_ns: int, size: int) -> str:  # read once per file version, not once per run
    return sha256_file(path)


def set_dropout(model: ForSequenceClassification, p: float) -> None:
    """Every hidden dropout layer to `p`, and the config too, so the saved fine-tuned model records it."""
    model.config.dropout = p
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FinetuneError(f"device {name!r}: CUDA is not available on this machine")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 autocast on a GPU that supports it, fp16 (with loss scaling) on older GPUs, fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise FinetuneError("precision fp16 needs a GPU (use bf16 or fp32 on CPU)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
