"""Read the logged history back out of an offline W&B run file (``run-<id>.wandb``).

wandb ships no Python reader for these files.  The format is a LevelDB-style log: a 7-byte
file header (``:W&B``, a 2-byte magic, a version byte), then 32 KiB blocks of records,
each with a 7-byte header (crc32, little-endian uint16 length, type: 1 full, 2 first,
3 middle, 4 last) and a payload; the payloads of a first..last chain concatenate to one
``wandb_internal_pb2.Record`` protobuf message.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_payloads(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {data[:4]!r})")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:
            pos += left_in_block  # trailer padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue  # zero padding at the end of a block
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_history(path: Path) -> list[dict[str, Any]]:
    """The ``history`` rows logged to a run file, each as ``{key: value}`` incl. ``_step``."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in iter_payloads(path):
        # the module picks its classes by protobuf version (star import); mypy cannot see them
        rec = pb.Record()  # type: ignore[attr-defined]
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def find_run_file(run_dir: Path) -> Path:
    files = sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no W&B run file under {run_dir}/wandb")
    return files[-1]
