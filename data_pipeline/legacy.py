"""Format 1 shards (one tar member `{key}.ids.u16` per sequence), the layout written before blocks: still
read by `shards.read_shard`. `write_format1_copy` writes a finished build in it, for the tests that old
shards are still read and for `bench.data_pipeline`'s before/after bytes per token."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

from common.files import sha256_file, write_json_atomic

from .shards import DTYPES, iter_shard, read_manifest


def write_format1_copy(build_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy a finished build as format 1, with its own manifest. Returns the copy's manifest path."""
    m = read_manifest(build_dir)
    src, out = Path(m.pop("_root")), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / m["tokenizer"]["file"], out / m["tokenizer"]["file"])
    ext, dtype = DTYPES[m["dtype"]]
    for info in m["splits"].values():
        for rec in info["shards"]:
            (out / rec["path"]).parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(out / rec["path"], "w", format=tarfile.USTAR_FORMAT) as tf:
                for key, ids in iter_shard(src / rec["path"], m["seq_len"]):
                    data = ids.astype(dtype).tobytes()
                    ti = tarfile.TarInfo(f"{key}.ids.{ext}")
                    ti.size, ti.mode = len(data), 0o444
                    tf.addfile(ti, io.BytesIO(data))
            rec["sha256"], rec["bytes"] = sha256_file(out / rec["path"]), (out / rec["path"]).stat().st_size
    m["format_version"] = 1
    m.pop("block_sequences", None)
    write_json_atomic(out / "manifest.json", m)
    return out / "manifest.json"
