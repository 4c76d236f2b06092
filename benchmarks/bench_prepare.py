"""Per-volume cost of `vlp3d prepare` preprocessing versus bare decompression, on full-size CTs.

    python benchmarks/bench_prepare.py                 # 4 phantom CTs of 512x512x~250 (synthesised once)
    python benchmarks/bench_prepare.py --corpus DIR    # any CT-RATE-layout folder

Single core (torch and numpy threads = 1): for each volume, the bare floor
`nibabel.load(f).get_fdata()` and the full preprocessing (HU decision + MONAI Orientation, Spacing,
window, crop/pad) for the MG-3D spec (128x128x96 at 0.75x0.75x1.5 mm) and the demo spec
(48^3 at 8 mm), and optionally T3D's high-resolution storage at 1 mm isotropic with and without
the body crop (`--specs t3d t3d_nocrop`). ratio = bare time / preprocessing time (target >= 0.6);
stored MB = the image bytes of one shard row (raw; and after Parquet's default snappy compression).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import io  # noqa: E402

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from vlp3d.data.corpus import metadata_scaling, read_ctrate  # noqa: E402
from vlp3d.data.phantom import synthesize  # noqa: E402
from vlp3d.data.volume import PreprocessSpec, load_nifti_hu, preprocess_hu  # noqa: E402
from vlp3d.table import format_table  # noqa: E402

SPECS = {
    "mg3d": PreprocessSpec(shape=(128, 128, 96), spacing_mm=(0.75, 0.75, 1.5)),
    "demo": PreprocessSpec(),
    "t3d": PreprocessSpec(shape=(96, 96, 96), spacing_mm=(1.0, 1.0, 1.0), storage="highres", foreground_crop=True),
    "t3d_nocrop": PreprocessSpec(shape=(96, 96, 96), spacing_mm=(1.0, 1.0, 1.0), storage="highres"),
}
DEFAULT_SPECS = ["mg3d", "demo"]


def stored_bytes(volume: np.ndarray) -> tuple[int, int]:
    """(raw bytes, bytes in a one-row Parquet file with pyarrow's default snappy compression)."""
    raw = volume.astype(volume.dtype.newbyteorder("<")).tobytes()
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array([raw], type=pa.binary())}), buffer)
    return len(raw), buffer.tell()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="benchmarks/results/full_corpus", help="CT-RATE-layout folder (written if missing)")
    parser.add_argument("--n", type=int, default=4, help="volumes to synthesise when the corpus is missing (default 4)")
    parser.add_argument("--specs", nargs="+", default=DEFAULT_SPECS, choices=list(SPECS),
                        help=f"preprocessing specs to time (default {' '.join(DEFAULT_SPECS)})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = Path(args.corpus)
    if not corpus.is_dir():
        print(f"synthesising {args.n} full-size phantom CTs into {corpus} (about a minute each per core)...")
        synthesize(corpus, args.n, seed=0, full_size=True)
    rows = read_ctrate(corpus).to_dict("records")
    timings: dict[str, list[float]] = {"bare": [], **{name: [] for name in args.specs}}
    sizes = []
    stored: dict[str, list[tuple[int, int]]] = {name: [] for name in args.specs}
    shapes: dict[str, list[tuple[int, ...]]] = {name: [] for name in args.specs}
    for row in rows:
        start = time.perf_counter()
        data = nib.load(row["image"]).get_fdata()
        timings["bare"].append(time.perf_counter() - start)
        sizes.append(data.shape)
        del data
        for name in args.specs:
            start = time.perf_counter()
            hu, affine, _ = load_nifti_hu(row["image"], metadata_scaling(row))
            volume = preprocess_hu(hu, affine, SPECS[name])
            timings[name].append(time.perf_counter() - start)
            stored[name].append(stored_bytes(volume))
            shapes[name].append(volume.shape)
            del hu, volume
    bare = statistics.median(timings["bare"])
    table = [["nibabel get_fdata (floor)", f"{bare:.2f}", f"{1 / bare:.2f}", "1.00", "", ""]]
    for name in args.specs:
        t = statistics.median(timings[name])
        spec = SPECS[name]
        if spec.storage == "highres":
            label = f"prepare {name} highres @ {spec.spacing_mm} mm{' + body crop' if spec.foreground_crop else ''}"
        else:
            label = f"prepare {name} {'x'.join(map(str, spec.shape))} @ {spec.spacing_mm} mm"
        raw = statistics.median(b[0] for b in stored[name]) / 2**20
        packed = statistics.median(b[1] for b in stored[name]) / 2**20
        table.append([label, f"{t:.2f}", f"{1 / t:.2f}", f"{bare / t:.2f}", f"{raw:.1f} / {packed:.1f}",
                      " ".join("x".join(map(str, s)) for s in shapes[name])])
    print(format_table(table, ["per volume, 1 core", "median s", "volumes/s", "ratio to floor",
                               "stored MB raw / parquet", "stored shapes"],
                       title=f"{len(rows)} volumes, shapes {sorted(set(sizes))}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
