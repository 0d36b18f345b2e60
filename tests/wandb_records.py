"""Reads the records of W&B's offline run files (run-<id>.wandb), for the tests.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks
of records, each a 7-byte header (checksum, length, kind: full, first, middle, last) and a
protobuf `Record` of wandb.proto.wandb_internal_pb2, or a piece of one.
"""

import struct

BLOCK, HEADER = 32768, 7


def records(path):
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pieces, whole = HEADER, b"", []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        if kind == 1:
            whole.append(chunk)
        elif kind in (2, 3):
            pieces = chunk if kind == 2 else pieces + chunk
        elif kind == 4:
            whole.append(pieces + chunk)
        else:
            break
    for raw in whole:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def history(path) -> list[tuple[int, dict]]:
    """(step, {key: value}) of each history row logged to the file."""
    import json

    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows.append((record.history.step.num, items))
    return rows


def run_ids(path) -> set[str]:
    return {r.run.run_id for r in records(path) if r.WhichOneof("record_type") == "run"}
