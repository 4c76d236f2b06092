"""A split read by one run is held by the process for the next run in it (a sweep's trials in one reused
Tune actor): the same files, columns and split are read once; anything else is read again."""

import pyarrow as pa
import pyarrow.parquet as pq

from vlp3d.train import feed


def test_the_next_run_in_the_process_reads_a_held_split_from_memory(tmp_path, monkeypatch):
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"split": ["train", "train", "valid"], "x": [1.0, 2.0, 3.0], "y": [0, 1, 2],
                             "fraction_rank": [0.2, 0.7, 0.5], "patient_id": ["a", "b", "c"]}), path)
    reads = []
    real = feed.read_blocks

    def counting(*args, **kwargs):
        reads.append(args[1:])
        yield from real(*args, **kwargs)

    monkeypatch.setattr(feed, "read_blocks", counting)
    monkeypatch.setattr(feed, "_HELD", feed.OrderedDict())
    first = feed.LocalRows([str(path)], ["x"], "train", materialize="always")
    assert [b["x"].tolist() for b in first.blocks()] == [[1.0, 2.0]] and len(reads) == 1
    again = feed.LocalRows([str(path)], ["x"], "train", materialize="always")  # the next trial's run
    assert [b["x"].tolist() for b in again.blocks()] == [[1.0, 2.0]] and len(reads) == 1
    for other in (feed.LocalRows([str(path)], ["y"], "train", materialize="always"),  # other columns
                  feed.LocalRows([str(path)], ["x"], "train", fraction=0.5, materialize="always"),  # other subset
                  feed.LocalRows([str(path)], ["x"], "valid", materialize="always")):  # other split
        list(other.blocks())
    assert len(reads) == 4 and len(feed._HELD) == feed.HELD_SPLITS  # the oldest was let go
    never = feed.LocalRows([str(path)], ["x"], "valid", materialize="never")
    list(never.blocks())
    assert len(reads) == 5 and len(feed._HELD) == feed.HELD_SPLITS  # a split not held in memory is not kept
