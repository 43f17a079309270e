# Generated from hypermixer/hf/release.py by hypermixer.hf.release when this release was written; do not edit.
"""What a release folder holds for Hugging Face transformers, written without importing transformers.

- `hf_config_fields`: the config.json keys Hugging Face reads (`model_type`, `auto_map`, `architectures`,
  the usual flat names such as `hidden_size`, and `id2label`/`problem_type` for a classifier). They sit
  next to the keys `hypermixer`'s own reader uses (`format_version`, `architecture`, `encoder`, `head`).
- `release_code` / `write_release_code`: the Python files `auto_map` names and everything they import,
  **generated from this package's own source** each time a release is written, so there is no second
  copy of the model to keep in step. Hugging Face's dynamic-module loader copies the files a module
  reaches through relative imports (`from .name import ...`) in the same folder, so every module of
  `hypermixer` becomes one flat file (hypermixer/mixers/attention.py -> hypermixer_mixers_attention.py)
  and its `from hypermixer.x.y import` lines become `from .hypermixer_x_y import`. The two entry files
  keep Hugging Face's usual names: configuration_hypermixer.py and modeling_hypermixer.py. Run from such
  a release copy (a model loaded through the Auto classes, then saved), the same functions copy the
  release's files instead.
- `tokenizer_files`: tokenizer.json plus the side files `AutoTokenizer` reads (special tokens,
  `model_max_length`).
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

MODEL_TYPE = "hypermixer"
# The library's class (config.json "architecture") -> its Hugging Face wrapper in modeling_hypermixer.py.
HF_CLASSES = {
    "Encoder": "HyperMixerModel",
    "ForMaskedLM": "HyperMixerForMaskedLM",
    "ForSequenceClassification": "HyperMixerForSequenceClassification",
}
AUTO_MAP = {
    "AutoConfig": "configuration_hypermixer.HyperMixerConfig",
    "AutoModel": "modeling_hypermixer.HyperMixerModel",
    "AutoModelForMaskedLM": "modeling_hypermixer.HyperMixerForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_hypermixer.HyperMixerForSequenceClassification",
}
# Hugging Face's usual config names -> EncoderConfig fields (written flat into config.json for HF's tools).
HF_FIELD_NAMES = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_seq_len",
    "type_vocab_size": "type_vocab_size",
    "pad_token_id": "pad_token_id",
    "layer_norm_eps": "layer_norm_eps",
    "initializer_range": "initializer_range",
}

ENTRY_MODULES = {
    "hypermixer.hf.configuration_hypermixer": "configuration_hypermixer.py",
    "hypermixer.hf.modeling_hypermixer": "modeling_hypermixer.py",
}
_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the `hypermixer` package, when run from it
_HEADER = "# Generated from {source} by hypermixer.hf.release when this release was written; do not edit.\n"
# What Hugging Face's loader follows (transformers.dynamic_module_utils.get_relative_imports).
_RELATIVE_IMPORT = re.compile(r"^\s*(?:import\s+\.(\S+)\s*$|from\s+\.(\S+)\s+import)", re.MULTILINE)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
SPECIAL_TOKENS = ("pad", "unk", "cls", "sep", "mask")
BERT_SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def hf_config_fields(architecture: str, encoder: dict, head: dict) -> dict:
    """The config.json keys for Hugging Face, from the library's architecture name, encoder config and head."""
    if architecture not in HF_CLASSES:
        raise ValueError(f"no Hugging Face class for architecture {architecture!r} (known: {', '.join(HF_CLASSES)})")
    fields = {
        "model_type": MODEL_TYPE,
        "architectures": [HF_CLASSES[architecture]],
        "auto_map": dict(AUTO_MAP),
        **{name: encoder[field] for name, field in HF_FIELD_NAMES.items()},
    }
    if "num_labels" in head:
        labels = [f"LABEL_{i}" for i in range(int(head["num_labels"]))]
        fields["id2label"] = {str(i): label for i, label in enumerate(labels)}
        fields["label2id"] = {label: i for i, label in enumerate(labels)}
        if len(labels) == 1:
            fields["problem_type"] = "regression"  # one output: a score (STS-B), mean squared error
    return fields


def release_file_name(module: str) -> str:
    """hypermixer.mixers.attention -> hypermixer_mixers_attention.py; the entry modules keep HF's names."""
    return ENTRY_MODULES.get(module) or module.replace(".", "_") + ".py"


def release_code() -> dict[str, str]:
    """{file name: source} of the Python files a release carries, in name order."""
    if __name__ == "hypermixer.hf.release":
        return _generate_from_package()
    return _copy_from_release(Path(__file__).resolve().parent)


def write_release_code(directory: str | os.PathLike) -> list[Path]:
    """Write the release's Python files into `directory` (each under a temporary name, then renamed)."""
    directory = Path(directory)
    written = []
    for name, text in release_code().items():
        path = directory / name
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(path)
    return written


def stale_release_code(directory: str | os.PathLike) -> list[str]:
    """Names of the code files that are missing from `directory` or differ from what this code writes."""
    directory = Path(directory)
    return [
        name
        for name, text in release_code().items()
        if not (directory / name).is_file() or (directory / name).read_text(encoding="utf-8") != text
    ]


def _source_path(module: str) -> Path:
    parts = module.split(".")
    path = _PACKAGE_DIR.joinpath(*parts[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _generate_from_package() -> dict[str, str]:
    files: dict[str, str] = {}
    todo = list(ENTRY_MODULES)
    while todo:
        module = todo.pop()
        name = release_file_name(module)
        if name in files:
            continue
        path = _source_path(module)
        source = path.relative_to(_PACKAGE_DIR.parent).as_posix()  # hypermixer/mixers/attention.py
        text, imported = _flatten(path.read_text(encoding="utf-8"), source)
        files[name] = _HEADER.format(source=source) + text
        todo.extend(imported)
    for name, text in files.items():  # what Hugging Face will look for must be there (a docstring can fool its regex)
        for target in _relative_imports(text):
            if f"{target}.py" not in files:
                raise ValueError(f"release code: {name} refers to .{target}, which is not part of the release")
    return dict(sorted(files.items()))


def _flatten(source: str, where: str) -> tuple[str, list[str]]:
    """Rewrite `from hypermixer.x import ...` into `from .hypermixer_x import ...`; returns (text, modules)."""
    lines = source.splitlines(keepends=True)
    imported = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "hypermixer" for a in node.names):
            raise ValueError(
                f"{where}:{node.lineno}: write `from hypermixer.x import y`, not `import hypermixer...`, "
                "so that the release code can be generated"
            )
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            raise ValueError(
                f"{where}:{node.lineno}: relative import; the package uses absolute `from hypermixer.x import y`"
            )
        module = node.module or ""
        if module == "hypermixer":
            raise ValueError(
                f"{where}:{node.lineno}: import from the submodule (`from hypermixer.x import y`), not from the package"
            )
        if not module.startswith("hypermixer."):
            continue
        target = release_file_name(module)[: -len(".py")]
        line = lines[node.lineno - 1]
        new, count = re.subn(rf"\bfrom\s+{re.escape(module)}\s+import\b", f"from .{target} import", line, count=1)
        if count != 1:
            raise ValueError(f"{where}:{node.lineno}: cannot rewrite this import for the release")
        lines[node.lineno - 1] = new
        imported.append(module)
    return "".join(lines), imported


def _relative_imports(text: str) -> list[str]:
    return sorted({a or b for a, b in _RELATIVE_IMPORT.findall(text)})


def _copy_from_release(folder: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    todo = list(ENTRY_MODULES.values())
    while todo:
        name = todo.pop()
        if name in files:
            continue
        files[name] = (folder / name).read_text(encoding="utf-8")
        todo.extend(f"{target}.py" for target in _relative_imports(files[name]))
    return dict(sorted(files.items()))


def tokenizer_files(source: str | os.PathLike, model_max_length: int) -> dict[str, str]:
    """{file name: text} for a release: `tokenizer.json` (`source`, or the one in the folder `source`),
    and `tokenizer_config.json` (with the special tokens and `model_max_length`) plus
    `special_tokens_map.json` for Hugging Face's AutoTokenizer: from the side files next to it when there
    are some (a data_pipeline build, a release), else from the BERT-style special tokens
    ([PAD] [UNK] [CLS] [SEP] [MASK]) in tokenizer.json."""
    source = Path(source)
    tokenizer_path = source / TOKENIZER_FILE if source.is_dir() else source
    folder = tokenizer_path.parent
    if not tokenizer_path.is_file():
        raise FileNotFoundError(
            f"{tokenizer_path}: no such file (a release needs the tokenizer its model was trained with)"
        )
    text = tokenizer_path.read_text(encoding="utf-8")
    config = _read_json_object(folder / TOKENIZER_CONFIG_FILE)
    special_map = _read_json_object(folder / SPECIAL_TOKENS_MAP_FILE)
    added = _special_tokens_in(text, tokenizer_path)
    specials = {}
    for name in SPECIAL_TOKENS:
        key = f"{name}_token"
        value = config.get(key) or special_map.get(key)
        if not value and BERT_SPECIAL_TOKENS[name] in added:
            value = BERT_SPECIAL_TOKENS[name]
        if value:
            specials[key] = value
    missing = [f"{name}_token" for name in SPECIAL_TOKENS if f"{name}_token" not in specials]
    if missing:
        raise ValueError(
            f"{folder / TOKENIZER_CONFIG_FILE}: no {', '.join(missing)} (and tokenizer.json has no "
            f"BERT-style special token to take it from)"
        )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **config,
        **specials,
        "model_max_length": int(model_max_length),
    }
    return {
        TOKENIZER_FILE: text,
        TOKENIZER_CONFIG_FILE: json.dumps(config, indent=2) + "\n",
        SPECIAL_TOKENS_MAP_FILE: json.dumps(specials, indent=2) + "\n",
    }


def missing_tokenizer_files(folder: str | os.PathLike) -> list[str]:
    """The tokenizer files AutoTokenizer needs that a local folder lacks ([] for anything but a folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [name for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE) if not (folder / name).is_file()]


def _read_json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def _special_tokens_in(tokenizer_json: str, path: Path) -> set[str]:
    try:
        spec = json.loads(tokenizer_json)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return {
        str(t["content"])
        for t in spec.get("added_tokens") or []
        if isinstance(t, dict) and t.get("special") and "content" in t
    }
