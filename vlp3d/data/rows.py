"""Shard rows read without Ray: the columns training reads, as the numpy batches Ray Data hands out.

Ray Data writes a tensor column as a Parquet `large_list` whose field metadata names the Arrow
extension `ray.data.arrow_tensor_v2` and the shape of one element; read without Ray registered
it is a plain list column. `column_to_numpy` turns either form (and, where Ray is imported in this
process, Ray's extension array) into the array `iter_batches(batch_format="numpy")` gives: the
element shape after the rows ([n, 48, 48, 48] float16 volumes), strings and bytes as object
arrays. Rows keep the order of the files (sorted) and of the rows inside them, which is the order
Ray Data keeps with `preserve_order`: a one-process run reads the same rows in the same order as a
one-worker Ray Train run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vlp3d import storage
from vlp3d.data.splits import parse_split

TENSOR_EXTENSIONS = ("ray.data.arrow_tensor_v2", "ray.data.arrow_tensor")
Block = dict[str, np.ndarray]


def _element_shape(field: pa.Field) -> tuple[int, ...] | None:
    """The element shape of a tensor column written by Ray Data, from its field metadata (None: not one)."""
    if isinstance(field.type, pa.ExtensionType):
        shape = getattr(field.type, "shape", None)
        return tuple(int(s) for s in shape) if shape is not None else None
    metadata = field.metadata or {}
    if metadata.get(b"ARROW:extension:name", b"").decode() in TENSOR_EXTENSIONS:
        return tuple(int(s) for s in json.loads(metadata[b"ARROW:extension:metadata"]))
    return None


def column_to_numpy(column: pa.ChunkedArray | pa.Array, field: pa.Field) -> np.ndarray:
    """One column as Ray Data's numpy batches hold it (see the module docstring)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    shape = _element_shape(field)
    if shape is None:
        if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type) or pa.types.is_string(array.type):
            out = np.empty(len(array), dtype=object)
            out[:] = array.to_pylist()
            return out
        return array.to_numpy(zero_copy_only=False)
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape((len(array), *shape))


def table_to_block(table: pa.Table) -> Block:
    return {name: column_to_numpy(table.column(name), table.schema.field(name)) for name in table.column_names}


def read_blocks(files: Sequence[str], columns: Sequence[str], split: str | None = None,
                fraction: float = 1.0, limit: int = 0, nonempty: str = "") -> Iterator[Block]:
    """The rows of `files` (local paths or URIs of one filesystem) in `split` and inside the nested
    `fraction` subset (shard column `fraction_rank`), with a non-empty `nonempty` column (e.g. the
    label map) when given, at most `limit` of them (0: all), one block per file, in file order; only
    `columns` are returned."""
    fs, paths = storage.for_reading(list(files))
    part = parse_split(split) if split is not None else None
    by_patient = part is not None and not part.whole
    wanted = list(dict.fromkeys([*columns, *(["split"] if split is not None else []), *(["patient_id"] if by_patient
                                 else []), *(["fraction_rank"] if fraction < 1.0 else []), *([nonempty] if nonempty else [])]))
    left = limit or None
    for path in paths:
        table = pq.read_table(path, columns=wanted, filesystem=fs)
        keep = None
        if part is not None:
            keep = pc.equal(table.column("split"), part.split)
            if by_patient:  # a part of a stored split (vlp3d.data.splits)
                inside = pa.array([part.contains(p) for p in table.column("patient_id").to_pylist()], pa.bool_())
                keep = pc.and_(keep, inside)
        if fraction < 1.0:
            inside = pc.less(table.column("fraction_rank"), fraction)
            keep = inside if keep is None else pc.and_(keep, inside)
        if nonempty:
            present = pc.fill_null(pc.greater(pc.binary_length(table.column(nonempty)), 0), False)
            keep = present if keep is None else pc.and_(keep, present)
        if keep is not None:
            table = table.filter(keep)
        if left is not None:
            table = table.slice(0, left)
            left -= table.num_rows
        if table.num_rows:
            yield table_to_block(table.select(list(columns)))
        if left is not None and left <= 0:
            return


def block_rows(block: Block) -> int:
    return len(next(iter(block.values()))) if block else 0
