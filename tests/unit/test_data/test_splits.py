"""A report split carved from a held-out split by a hash of the patient ids: the two parts are disjoint
by patient, together the whole split, about the asked shares, the same on every call, and every reader
(local rows, row counts, patients, split hash) agrees on them."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlp3d.data.corpus import fraction_ranks
from vlp3d.data.patients import part_patients, split_hash
from vlp3d.data.rows import read_blocks
from vlp3d.data.shards import count_rows
from vlp3d.data.splits import carve, expected_rows, parse_split


def test_names_of_parts():
    assert carve("valid", 0.5) == ("valid[0:0.5]", "valid[0.5:1]")
    assert carve("valid", 0.3) == ("valid[0:0.7]", "valid[0.7:1]")
    part = parse_split("valid[0.5:1]")
    assert (part.split, part.low, part.high, part.whole, str(part)) == ("valid", 0.5, 1.0, False, "valid[0.5:1]")
    assert parse_split("valid").whole and str(parse_split("test")) == "test"
    with pytest.raises(ValueError, match=r"needs 0 <= low < high <= 1, e.g. 'valid\[0:0.5\]'"):
        parse_split("valid[0.6:0.4]")
    assert expected_rows({"valid": 96, "train": 404}, "valid[0:0.5]") == 48


@pytest.fixture
def shards(tmp_path):
    """One shard file: 10 train and 40 valid patients (two scans each), a rare finding in a quarter of them."""
    rows = []
    for split, count in (("train", 10), ("valid", 40)):
        for p in range(count):
            for scan in "ab":
                rows.append({"patient_id": f"{split}{p}", "split": split, "volume_name": f"{split}{p}{scan}",
                             "modality": "ct", "rare": int(p % 4 == 0)})
    table = pd.DataFrame(rows)
    table["fraction_rank"] = fraction_ranks(table, ["rare"])
    table["row"] = np.arange(len(table))
    pq.write_table(pa.Table.from_pandas(table.drop(columns="rare").assign(rare=table["rare"])),
                   tmp_path / "part-0.parquet")
    (tmp_path / "_manifest.json").write_text('{"spec_hash": "x"}')
    return tmp_path, table


def test_the_parts_split_the_held_out_patients_in_two(shards):
    folder, table = shards
    select, report = carve("valid", 0.5)
    files = [str(folder / "part-0.parquet")]
    names = {split: {str(n) for block in read_blocks(files, ["volume_name"], split) for n in block["volume_name"]}
             for split in ("valid", select, report)}
    assert names[select] | names[report] == names["valid"] and not names[select] & names[report]
    selecting, reporting = part_patients(folder, select), part_patients(folder, report)
    assert not selecting & reporting and len(selecting | reporting) == 40
    assert 12 <= len(reporting) <= 28  # half of 40 patients, give or take the hash
    # a patient's scans stay together: two volumes per patient in each part
    assert len(names[select]) == 2 * len(selecting) and len(names[report]) == 2 * len(reporting)
    assert count_rows(folder, report) == len(names[report]) and count_rows(folder, "valid") == 80
    assert part_patients(folder, report) == reporting  # deterministic
    assert split_hash(folder, report) != split_hash(folder, select) != split_hash(folder, "valid")
