"""Tokenizer training / loading, and the bulk encoder used by the build.

Trained tokenizers use BERT-style special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4)
and a ``[CLS] $A [SEP]`` post-processor, and are saved as a single ``tokenizer.json`` that
loads in ``tokenizers.Tokenizer.from_file`` and in ``transformers.PreTrainedTokenizerFast``;
:func:`save_tokenizer` also writes ``tokenizer_config.json`` / ``special_tokens_map.json``
so that ``AutoTokenizer.from_pretrained(folder)`` knows the special tokens.
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from collections.abc import Iterable
from itertools import chain
from pathlib import Path

import numpy as np

from .errors import DataPipelineError

BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
SPECIAL_ORDER = ("pad", "unk", "cls", "sep", "mask")


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "wordpiece",
    vocab_size: int = 32768,
    lowercase: bool = True,
    min_frequency: int = 2,
    specials: dict | None = None,
    length: int | None = None,
    show_progress: bool = False,
):
    """Train a WordPiece (BERT-style), byte-level BPE or Unigram tokenizer from a text stream."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = dict(specials or BERT_SPECIALS)
    special_list = [specials[k] for k in SPECIAL_ORDER]
    unk = specials["unk"]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk, max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_list,
            show_progress=show_progress,
            continuing_subword_prefix="##",
        )
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        norm = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
        tok.normalizer = normalizers.Sequence(norm)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_list,
            show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        norm = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        tok.normalizer = normalizers.Sequence(norm)
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=special_list, unk_token=unk, show_progress=show_progress
        )
    else:
        raise DataPipelineError(f"unknown tokenizer kind {kind!r}")
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    if tok.get_vocab_size() <= len(special_list):
        raise DataPipelineError("tokenizer training saw no usable text (are all documents filtered out?)")
    if kind == "wordpiece":
        tok = _canonical_wordpiece(tok, special_list)
    cls_id, sep_id = tok.token_to_id(specials["cls"]), tok.token_to_id(specials["sep"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{specials['cls']} $A {specials['sep']}",
        pair=f"{specials['cls']} $A {specials['sep']} $B:1 {specials['sep']}:1",
        special_tokens=[(specials["cls"], cls_id), (specials["sep"], sep_id)],
    )
    return tok


def _canonical_wordpiece(tok, special_list: list[str]):
    """Renumber a trained WordPiece vocabulary deterministically (specials first, then the
    rest sorted).  The trainer breaks frequency ties in hash-map order, so two trainings on
    the same text give the same tokens under shuffled ids; WordPiece encoding depends only on
    the set of tokens, so sorted ids make the same training give the same tokenizer.json."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    rest = sorted(t for t in vocab if t not in special_list)
    spec["model"]["vocab"] = {t: i for i, t in enumerate(special_list + rest)}
    for added in spec.get("added_tokens", []):
        added["id"] = spec["model"]["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(spec))


def resolve_tokenizer_file(spec: str) -> Path:
    p = Path(spec)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataPipelineError(f"{p}: tokenizer file not found")
    return p


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    p = resolve_tokenizer_file(str(path))
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise DataPipelineError(f"{p}: cannot load tokenizer ({e})") from None


def special_ids(tok, specials: dict | None = None) -> dict[str, int]:
    specials = dict(specials or BERT_SPECIALS)
    out = {}
    for k in SPECIAL_ORDER:
        i = tok.token_to_id(specials[k])
        if i is None:
            raise DataPipelineError(f"tokenizer has no {k} token {specials[k]!r} (set special_tokens in the config)")
        out[k] = int(i)
    return out


def save_tokenizer(tok, out_dir: str | Path, specials: dict | None = None, model_max_length: int | None = None) -> Path:
    """Write ``tokenizer.json`` (+ transformers side files) into ``out_dir``."""
    from common.files import write_json_atomic

    specials = dict(specials or BERT_SPECIALS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tokenizer.json.tmp"
    tok.save(str(tmp))
    tmp.replace(out_dir / "tokenizer.json")
    names = {f"{k}_token": specials[k] for k in SPECIAL_ORDER}
    write_json_atomic(out_dir / "special_tokens_map.json", names)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **names}
    if model_max_length:
        cfg["model_max_length"] = model_max_length
    write_json_atomic(out_dir / "tokenizer_config.json", cfg)
    return out_dir / "tokenizer.json"


def copy_tokenizer(src: str | Path, out_dir: str | Path, specials: dict | None = None) -> Path:
    p = resolve_tokenizer_file(str(src))
    tok = load_tokenizer(p)
    special_ids(tok, specials)  # fail early if a special token is missing
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "tokenizer.json"
    if p.resolve() != dst.resolve():
        shutil.copyfile(p, out_dir / "tokenizer.json.tmp")
        (out_dir / "tokenizer.json.tmp").replace(dst)
    from common.files import write_json_atomic

    specials = dict(specials or BERT_SPECIALS)
    names = {f"{k}_token": specials[k] for k in SPECIAL_ORDER}
    write_json_atomic(out_dir / "special_tokens_map.json", names)
    write_json_atomic(out_dir / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **names})
    return dst


# --------------------------------------------------------------------------- bulk encoding

# BertNormalizer(clean_text=True) on ASCII: drop control characters, map \t \n \r to a space.
_ASCII_CLEAN = {c: None for c in range(32)} | {0x7F: None} | {9: 32, 10: 32, 13: 32}


class _CharMap(dict):
    """code point -> what the tokenizer's (character-local) normalizer makes of it.

    Filled lazily from the normalizer itself (``normalize_str`` of the single character), so
    it is right by construction for every character it accepts; characters whose result
    could depend on their neighbours (unassigned, surrogates, and non-Mn combining marks,
    which canonical reordering may move) are marked unsafe and send their document down
    the ordinary path.
    """

    def __init__(self, normalizer):
        super().__init__()
        self.normalizer = normalizer
        self.unsafe: set[int] = set()

    def __missing__(self, cp: int) -> str:
        c = chr(cp)
        cat = unicodedata.category(c)
        if cat in ("Cn", "Cs") or (unicodedata.combining(c) and cat != "Mn"):
            self.unsafe.add(cp)
            v = c
        else:
            v = self.normalizer.normalize_str(c)
        self[cp] = v
        return v


class BulkEncoder:
    """Encodes batches of documents into one flat id array plus per-document lengths.

    * no special tokens are added, and special-token *text* in a document (a literal
      "[SEP]") is tokenized as ordinary text, never turned into the special id;
    * ``encode_batch_fast`` (no offsets), one call per batch;
    * fast path for BERT-style tokenizers.  ``BertNormalizer`` works character by
      character (clean control characters and whitespace, pad CJK, strip accents, lowercase)
      but its Rust implementation tracks alignments and costs about as much as the rest of
      the tokenizer.  So documents are normalised in Python first, with C string methods
      (pure ASCII: ``lower()`` and a control-character clean-up; otherwise ``str.translate``
      with a per-character table filled from the normalizer itself), and then encoded by a
      copy of the tokenizer without a normalizer.  The ids are identical (the tests check
      it on WikiText-2, odd characters and every BMP character); documents with characters
      whose normalisation could depend on context take the ordinary path.
    """

    def __init__(self, tok):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tok.to_str())
        self.tok.encode_special_tokens = True
        self.fast = None
        spec = json.loads(tok.to_str())
        norm = spec.get("normalizer") or None
        if norm and norm.get("type") == "BertNormalizer":
            spec["normalizer"] = None
            self.fast = Tokenizer.from_str(json.dumps(spec))
            self.fast.encode_special_tokens = True
            self.lower = bool(norm.get("lowercase", True))
            self.clean = bool(norm.get("clean_text", True))
            self.charmap = _CharMap(self.tok.normalizer)

    def _ascii_ready(self, t: str) -> str | None:
        """The normalized text if ``t`` can take the fast path, else None."""
        if not t.isascii():
            cm = self.charmap
            for c in set(t):
                cm[ord(c)]  # fills the table (and the unsafe set) lazily
            if cm.unsafe and not cm.unsafe.isdisjoint(map(ord, set(t))):
                return None
            return t.translate(cm)
        if self.lower:
            t = t.lower()
        if not t.isprintable():
            if not self.clean:
                return None
            t = t.translate(_ASCII_CLEAN)
        return t

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (flat uint32 ids of all documents in order, int64 lengths per document)."""
        if self.fast is None:
            encs = self._encode(self.tok, texts)
        else:
            ready = [self._ascii_ready(t) for t in texts]
            slow_idx = [i for i, r in enumerate(ready) if r is None]
            if not slow_idx:
                encs = self._encode(self.fast, ready)
            else:
                fast_idx = [i for i, r in enumerate(ready) if r is not None]
                encs = [None] * len(texts)
                for i, e in zip(fast_idx, self._encode(self.fast, [ready[i] for i in fast_idx])):
                    encs[i] = e
                for i, e in zip(slow_idx, self._encode(self.tok, [texts[i] for i in slow_idx])):
                    encs[i] = e
        ids = [e.ids for e in encs]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
        return flat, lengths

    @staticmethod
    def _encode(tok, texts):
        if not texts:
            return []
        try:
            return tok.encode_batch_fast(texts, add_special_tokens=False)
        except (TypeError, ValueError):
            # lone surrogates (from JSON "\ud800" escapes) cannot cross into Rust: replace them
            clean = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]
            return tok.encode_batch_fast(clean, add_special_tokens=False)
