"""`vlp3d prepare`: a Ray Data pipeline from a corpus manifest to Parquet shards + `_manifest.json`.

Rows are split by modality before Ray Data and the pipeline runs once per modality present: CT
rows go to `<out>/<spec hash>/*.parquet`, 2D radiographs to `<out>/<spec hash>/xray/*.parquet`
(`vlp3d.data.shards.shard_files`).

Safety rules (docs/prepare.md):

- One run per folder: `_prepare.lock` in the shard folder holds an `fcntl.flock` for the whole run
  (`vlp3d.data.files.FolderLock`). A second prepare into the folder fails at once naming the
  folder, the lock file and the holder's PID/host; the kernel drops the lock of a process that
  died (SIGKILL included), and the next run takes it over with a warning. A finished folder with
  the same source is checked before locking, so concurrent no-op runs never collide.
- Status files (`_prepare.json`, `_manifest.json`, `_failed/row-*.json`) are written atomically
  (`vlp3d.data.files.write_json_atomic`): a reader sees the old file or the whole new one.
- A finished folder (one with `_manifest.json`) is never deleted or changed. Preparing a different
  corpus (another source manifest hash) with the same preprocessing spec raises `PrepareError`
  naming the folder, the corpus it holds and the new one. An unfinished folder (no
  `_manifest.json`) of a different source is cleared under the lock: no reader uses a folder
  without a manifest (`resolve_shard_dir`) and its rows are useless for the new source.
- A transient I/O error reading a row (an `OSError` with an errno other than not-found /
  permission / not-a-file, `TimeoutError`, `ConnectionError`) is retried: `READ_ATTEMPTS` calls
  with `RETRY_BACKOFF_S` doubling between them. Anything else (decoding errors, a missing file,
  a non-CT volume) fails the row at once. A failed row is recorded with its reason and attempts.
- Non-CT rows fail with their reason: a `modality` value other than CT or a radiograph alias
  (`normalise_modality`), or a volume that `vlp3d.data.hounsfield.not_ct_reason` rejects (DICOM
  Modality not CT, a label mask, no value below 0 HU).
- Accounting: before `_manifest.json` is written, written rows + failed rows must be exactly the
  input rows; otherwise `PrepareError` lists the missing row ids (a rerun resumes them).
- Privacy: `_failed/row-*.json` (kept in the finished folder) hold path, volume name, reason and
  attempts; `_manifest.json` (logged to MLflow with each run) holds only `{row, reason}` per
  failed row, the reason scrubbed (`vlp3d.redact.scrub`): the row's path and volume name replaced
  by `<image>`, other absolute paths by `<path>`, DICOM UIDs by `<uid>`, credentials removed.

Resume: `_prepare.json` (written first) records the source manifest hash. A run that stopped
before writing `_manifest.json` is resumed by the next run with the same source: rows found in
readable Parquet files (by `row` id) and rows recorded as failed (`_failed/`) are kept,
unreadable (partially written) files are deleted, and only the missing rows are processed. A
finished folder with the same source is a no-op (delete the folder to retry failed rows).
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

import vlp3d
from vlp3d import logs, storage
from vlp3d.config import ExperimentConfig
from vlp3d.data.corpus import (
    LABEL_MAP_COLUMN,
    fraction_ranks,
    manifest_hash,
    manifest_rows,
    read_corpus,
)
from vlp3d.data.files import FolderLock, remove_temporaries, write_json_atomic
from vlp3d.data.patients import ensure_patient_key
from vlp3d.data.shards import (
    MANIFEST,
    MODALITIES,
    MODALITY_DIRS,
    normalise_modality,
    preprocess_row,
    shard_files,
    spec_from_config,
)
from vlp3d.data.volume import PreprocessSpec
from vlp3d.objectives.model import text_dim_for
from vlp3d.platform.runtime import init_ray
from vlp3d.redact import redact, scrub

FAILED_DIR = "_failed"
PROGRESS = "_prepare.json"
LOCK = "_prepare.lock"
ROWS_PER_FILE = {"fixed": 256, "highres": 16}  # highres rows are MBs each: smaller files
_SUMMARY_COLUMNS = ["row", "split", "hu_source", "warnings", "modality"]
READ_ATTEMPTS = 3  # calls per row when reading fails with a transient I/O error
RETRY_BACKOFF_S = 0.5  # sleep before the 2nd call; doubled before each later one
# OSErrors that retrying cannot fix; an OSError without errno is a library's decoding error
# (gzip.BadGzipFile, PIL's UnidentifiedImageError / "image file is truncated"): not retried either
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG,
                     errno.ELOOP, errno.EINVAL}
MISSING_SHOWN = 10  # row ids listed in the accounting error

log = logging.getLogger(__name__)


class PrepareError(RuntimeError):
    """The shard folder cannot be (safely) written; the message names the folder and the fix."""

    exit_code = 2


@dataclass
class PrepareResult:
    shard_dir: Path | str  # a URI when prepared into one
    manifest: dict
    skipped: bool = False


class RowFailed(Exception):
    """Reading/preprocessing a row failed for good: `reason` and the number of `attempts`."""

    def __init__(self, reason: str, attempts: int):
        super().__init__(reason)
        self.reason, self.attempts = reason, attempts


def is_transient(err: BaseException) -> bool:
    """An I/O error that may pass on retry (network file system hiccup, timeout), see the module docstring."""
    if isinstance(err, TimeoutError | ConnectionError):
        return True
    if not isinstance(err, OSError) or isinstance(err, _PERMANENT_OS_ERRORS):
        return False
    return err.errno is not None and err.errno not in _PERMANENT_ERRNOS


def call_with_retries(fn, attempts: int | None = None, backoff_s: float | None = None, sleep=time.sleep):
    """`fn()`, called again after a transient error (`is_transient`), at most `attempts` times in all
    (default `READ_ATTEMPTS`, backoff `RETRY_BACKOFF_S` doubling). Raises `RowFailed` with the last
    error's reason and the number of calls made."""
    attempts = READ_ATTEMPTS if attempts is None else attempts
    backoff_s = RETRY_BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - every failure becomes a recorded reason
            if attempt < attempts and is_transient(err):
                sleep(backoff_s * 2 ** (attempt - 1))
                continue
            reason = f"{type(err).__name__}: {err}"
            if attempt > 1:
                reason += f" (after {attempt} attempts)"
            raise RowFailed(reason, attempt) from err
    raise AssertionError("unreachable")


def _record_failure(failed_dir: str | Path, row: dict, reason: str, attempts: int = 1) -> None:
    record = {"row": int(row["row"]), "path": str(row.get("image")),
              "volume_name": str(row.get("VolumeName")), "reason": reason, "attempts": attempts}
    write_json_atomic(Path(failed_dir, f"row-{int(row['row']):08d}.json"), record)


def _public_reason(record: dict) -> str:
    """A failure's reason without the row's path or volume name, other paths, DICOM UIDs or credentials
    (they may identify a patient): what `_manifest.json`, and so MLflow, holds. Names shorter than 4
    characters are left alone."""
    path = str(record.get("path") or "")
    names = {path, Path(path).name if path else "", str(record.get("volume_name") or "")}
    if path:
        names.add(str(Path(path).resolve()))
    return scrub(record.get("reason", ""), *(n for n in names if len(n) >= 4), mark="<image>")


def failure_records(shard_dir: str | Path) -> list[dict]:
    """Failed rows of a shard folder with path, volume name, reason and attempts (`_failed/`), by row."""
    if storage.is_uri(shard_dir):
        files = storage.files_with_suffix(storage.join(shard_dir, FAILED_DIR), ".json")
        return sorted((json.loads(storage.read_text(f)) for f in files), key=lambda r: r["row"])
    folder = Path(shard_dir) / FAILED_DIR
    return sorted((json.loads(p.read_text()) for p in folder.glob("*.json")), key=lambda r: r["row"])


def _preprocess_batch(batch: dict, spec: PreprocessSpec, label_names: list[str], failed_dir: str,
                      counter=None) -> dict:
    """Ray Data UDF: preprocess each row (transient read errors retried); a row that fails is
    written to `failed_dir` and dropped. `counter` (a `_RowCounter` actor) is told how many rows
    were done and failed, for the driver's progress bar."""
    rows = [dict(zip(batch.keys(), values, strict=True)) for values in zip(*batch.values(), strict=True)]
    out: dict[str, list] = {}
    failed = 0
    for row in rows:
        row = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
        try:
            shard_row = call_with_retries(lambda row=row: preprocess_row(row, spec, label_names))
        except RowFailed as failure:
            _record_failure(failed_dir, row, failure.reason, failure.attempts)
            failed += 1
            continue
        for key, value in shard_row.items():
            out.setdefault(key, []).append(value)
    if counter is not None:
        counter.add.remote(len(rows) - failed, failed)
    if not out:
        return {}
    tensors = ("labels", "spacing_mm_source", "image_shape")
    if spec.storage != "highres" or out["modality"][0] != "ct":
        tensors += ("image",)  # highres CT images are bytes: a binary column
    result = {key: np.stack(values) if key in tensors else np.array(values, dtype=object)
              for key, values in out.items()}
    result["row"] = np.asarray(out["row"], dtype=np.int64)
    for key in ("hu_slope", "hu_intercept", "fraction_rank"):
        result[key] = np.asarray(out[key], dtype=np.float32)
    return result


class ReportEncoder:
    """Ray Data actor: token ids and frozen report embeddings, model loaded once per actor."""

    def __init__(self, text_encoder: str, max_tokens: int, with_embeddings: bool, max_sentences: int):
        import torch

        from vlp3d.encoders.text import TextEncoder

        torch.set_num_threads(1)
        self.encoder = TextEncoder(text_encoder, max_tokens=max_tokens)
        self.with_embeddings = with_embeddings
        self.max_sentences = max_sentences

    def __call__(self, batch: dict) -> dict:
        from vlp3d.encoders.text import embed_report_sentences

        tokens = self.encoder.tokenize(list(batch["report"]))
        batch["input_ids"] = tokens["input_ids"].numpy().astype(np.int32)
        batch["attention_mask"] = tokens["attention_mask"].numpy().astype(np.int8)
        sentences = [str(s).split("\n") for s in batch["sentences"]]
        if self.with_embeddings:
            reports, per_sentence, mask = embed_report_sentences(self.encoder, sentences, self.max_sentences)
            batch["report_embedding"] = reports.numpy().astype(np.float32)
            # fixed width so every shard row has the same tensor shape (padded, with a mask)
            full = np.zeros((len(sentences), self.max_sentences, per_sentence.shape[-1]), dtype=np.float16)
            full_mask = np.zeros((len(sentences), self.max_sentences), dtype=np.bool_)
            full[:, :per_sentence.shape[1]] = per_sentence.numpy()
            full_mask[:, :mask.shape[1]] = mask.numpy()
            batch["sentence_embeddings"], batch["sentence_mask"] = full, full_mask
        return batch


def prepare(cfg: ExperimentConfig, corpus: str, out: str, progress=log.info,
            rows_per_file: int | None = None) -> PrepareResult:
    """Preprocess `corpus` into `out/<spec_hash>/`; unchanged input and spec is a no-op, a run that
    stopped halfway is resumed, a folder in use or holding another corpus raises (see the module
    docstring). `rows_per_file`: Parquet rows per file (default 256, highres 16). `out` may be a
    pyarrow filesystem URI (`prepare_to_uri`)."""
    logs.ensure_configured()
    if storage.is_uri(out):
        return prepare_to_uri(cfg, corpus, out, progress, rows_per_file)
    started = time.time()
    spec = spec_from_config(cfg)
    table = read_corpus(corpus, valid_fraction=cfg.data.valid_fraction)
    label_names = list(table.attrs["label_names"])
    table["fraction_rank"] = fraction_ranks(table, label_names)
    source_hash = manifest_hash(table)
    shard_dir = Path(out).resolve() / spec.hash
    ensure_patient_key(shard_dir.parent, progress)  # also for shards prepared before the key existed
    finished = _finished_manifest(shard_dir, corpus, source_hash, progress)
    if finished is not None:  # checked before locking: concurrent no-op runs never collide
        return PrepareResult(shard_dir, finished, skipped=True)
    shard_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(shard_dir / LOCK, "prepare", warn=lambda message: progress(f"warning: {message}")):
        finished = _finished_manifest(shard_dir, corpus, source_hash, progress)  # finished meanwhile?
        if finished is not None:
            return PrepareResult(shard_dir, finished, skipped=True)
        manifest = _prepare_locked(cfg, spec, corpus, table, label_names, source_hash, shard_dir, progress,
                                   rows_per_file, started)
    return PrepareResult(shard_dir, manifest)


def prepare_to_uri(cfg: ExperimentConfig, corpus: str, out: str, progress=log.info,
                   rows_per_file: int | None = None) -> PrepareResult:
    """`prepare` into a pyarrow filesystem URI (`s3://bucket/shards`, vlp3d.storage). Object stores
    have neither the locks nor the atomic renames the safety rules above rest on, so the shards are
    prepared under those rules in a local staging folder, `<tracking.workdir>/staging/<out>/` (an
    interrupted run resumes there), then uploaded with `_manifest.json` last: a reader
    (`resolve_shard_dir`) never takes a partly uploaded folder. A finished remote folder is never
    overwritten (the same source: a no-op; another: PrepareError); the staging folder is deleted
    once uploaded. There is no lock on the URI: run one prepare per URI at a time."""
    storage.filesystem(out, "data.shards")  # a URI pyarrow cannot open: an error naming the key
    spec = spec_from_config(cfg)
    target = storage.join(out, spec.hash)
    table = read_corpus(corpus, valid_fraction=cfg.data.valid_fraction)
    table["fraction_rank"] = fraction_ranks(table, list(table.attrs["label_names"]))
    key = ensure_patient_key(out, progress)  # beside the shards in the bucket, and the same in the staging folder
    finished = _finished_manifest(target, corpus, manifest_hash(table), progress)
    if finished is not None:
        return PrepareResult(target, finished, skipped=True)
    staging = staging_folder(cfg, out)
    ensure_patient_key(staging, copy_of=key)
    progress(redact(f"preparing in {staging}, then uploading to {target}"))
    staged = prepare(cfg, corpus, str(staging), progress, rows_per_file)
    files = [p for p in staged.shard_dir.rglob("*") if p.is_file() and p.name != LOCK]
    with logs.progress_bar(sum(p.stat().st_size for p in files), "upload shards", unit="B", unit_scale=True) as bar:
        storage.upload(staged.shard_dir, str(target), last=(MANIFEST,), skip=(LOCK,),
                       on_file=lambda path: bar.update(path.stat().st_size))
    shutil.rmtree(staging)
    progress(redact(f"uploaded {len(files)} files to {target}"))
    return PrepareResult(target, staged.manifest, skipped=False)


def staging_folder(cfg: ExperimentConfig, out: str) -> Path:
    """Where `prepare_to_uri` prepares the shards for the URI `out`: <tracking.workdir>/staging/<out,
    one folder name>/ (e.g. staging/s3_bucket_shards/)."""
    return Path(cfg.tracking.workdir).resolve() / "staging" / re.sub(r"[^A-Za-z0-9._-]+", "_", out.rstrip("/"))


def _finished_manifest(shard_dir: Path | str, corpus: str, source_hash: str, progress) -> dict | None:
    """The manifest of a finished folder of this source; None if unfinished; raises if it holds another."""
    manifest_path = storage.join(shard_dir, MANIFEST)
    if not storage.is_file(manifest_path):
        return None
    try:
        existing = json.loads(storage.read_text(manifest_path))
    except ValueError as err:
        raise PrepareError(redact(
            f"{manifest_path} cannot be read ({err}); prepare never deletes a folder holding a manifest: "
            f"check it, or delete {shard_dir} yourself and prepare again")) from err
    held = existing.get("source_manifest_hash")
    if held == source_hash:
        progress(redact(f"shards up to date: {shard_dir} (spec {existing.get('spec_hash')}, source {source_hash})"))
        return existing
    new_corpus = str(Path(corpus).resolve())
    if existing.get("corpus") == new_corpus:
        what = (f"the corpus {new_corpus} changed since they were written (source manifest hash {held}, "
                f"now {source_hash})")
    else:
        what = (f"it holds the corpus {existing.get('corpus')} (source manifest hash {held}), this run prepares "
                f"{new_corpus} (source manifest hash {source_hash})")
    raise PrepareError(redact(
        f"{shard_dir} holds finished shards of another source with the same preprocessing "
        f"(spec {existing.get('spec_hash')}): {what}. prepare never deletes finished shards: choose another "
        f"--out for this corpus, or delete {shard_dir} yourself if those shards are no longer needed."))


def _prepare_locked(cfg, spec: PreprocessSpec, corpus: str, table: pd.DataFrame, label_names: list[str],
                    source_hash: str, shard_dir: Path, progress, rows_per_file: int | None,
                    started: float) -> dict:
    """The run itself, holding the folder's lock: resume or clear, pipelines, accounting, manifest."""
    import ray

    failed_dir = shard_dir / FAILED_DIR
    remove_temporaries(shard_dir)
    if failed_dir.is_dir():
        remove_temporaries(failed_dir)
    done = _resumable_rows(shard_dir, source_hash, spec.hash, progress)
    if done is None:  # nothing to resume: start afresh
        _clear_unfinished(shard_dir, progress)
        write_json_atomic(shard_dir / PROGRESS, {"source_manifest_hash": source_hash, "spec_hash": spec.hash})
        done = set()
    failed_dir.mkdir(parents=True, exist_ok=True)
    done |= _failed_rows(failed_dir)  # failures of the interrupted run stand, like those of a finished run

    rows = manifest_rows(table)
    todo: dict[str, list[dict]] = {}
    for row in rows:
        if row["row"] in done:
            continue
        try:
            modality = normalise_modality(row.get("modality"))
        except ValueError as err:
            _record_failure(failed_dir, row, f"ValueError: {err}")
            continue
        todo.setdefault(modality, []).append(row)
    if done:
        progress(f"resuming {shard_dir}: {len(done)} rows kept (written or failed), {sum(map(len, todo.values()))} to do")
    if todo:
        init_ray(cfg)
    for modality, modality_rows in todo.items():
        target = shard_dir / MODALITY_DIRS[modality]
        progress(f"preprocessing {len(modality_rows)} {modality} rows -> {target}")
        _run_pipeline(ray, cfg, spec, modality_rows, label_names, failed_dir, target,
                      rows_per_file or ROWS_PER_FILE[spec.storage if modality == "ct" else "fixed"])

    failed = failure_records(shard_dir)
    written = _written_summary(shard_dir)
    duplicated = int(written["row"].duplicated().sum())
    if duplicated:
        raise PrepareError(f"{shard_dir}: {duplicated} rows written twice; delete the folder and prepare again")
    _check_accounting(shard_dir, len(rows), {int(r) for r in written["row"]}, {int(r["row"]) for r in failed})
    warnings = [{"row": int(r.row), "warning": r.warnings} for r in written.itertuples() if r.warnings]
    manifest = {
        "vlp3d_version": vlp3d.__version__,
        "corpus": str(Path(corpus).resolve()),
        "source_manifest_hash": source_hash,
        "spec": spec.to_dict(),
        "spec_hash": spec.hash,
        "label_names": label_names,
        "text_dim": text_dim_for(cfg),
        "counts": {
            "rows": len(rows),
            "written": len(written),
            "failed": len(failed),
            "resumed": len(done),  # rows (written or failed) kept from an interrupted run
            "by_split": _counts(written["split"]),
            "by_modality": {m: int((written["modality"] == m).sum()) for m in MODALITIES
                            if (written["modality"] == m).any()},
            "hu_source": _counts(written["hu_source"]),
            "with_warnings": len(warnings),
        },
        # row ids and reasons only: the manifest is logged to MLflow; paths stay in _failed/
        "failed": [{"row": int(r["row"]), "reason": _public_reason(r)} for r in failed],
        "warnings": sorted(warnings, key=lambda r: r["row"]),
        "elapsed_s": round(time.time() - started, 1),
    }
    if LABEL_MAP_COLUMN in table.columns:  # voxel label maps carried into the shards (column label_map)
        manifest["label_maps"] = {"classes": table.attrs.get("label_map_classes"),
                                  "rows": int(table[LABEL_MAP_COLUMN].notna().sum())}
    write_json_atomic(shard_dir / MANIFEST, manifest, indent=2)
    return manifest


def _clear_unfinished(shard_dir: Path, progress) -> None:
    """Empty an unfinished folder of another source (or of no known source), keeping the lock file."""
    if (shard_dir / MANIFEST).exists():  # guarded by _finished_manifest; never delete finished shards
        raise PrepareError(f"{shard_dir} holds {MANIFEST}: refusing to clear it")
    entries = [p for p in shard_dir.iterdir() if p.name != LOCK]
    if entries:
        progress(f"clearing {shard_dir}: unfinished shards of another source ({len(entries)} entries)")
    for path in entries:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_accounting(shard_dir: Path, n_rows: int, written: set[int], failed: set[int]) -> None:
    """Every input row is written or recorded as failed, exactly once; else raise (no manifest)."""
    expected = set(range(n_rows))
    missing = sorted(expected - written - failed)
    unexpected = sorted((written | failed) - expected)
    both = sorted(written & failed)
    if not (missing or unexpected or both):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} rows neither written nor recorded as failed (first: "
                        f"{missing[:MISSING_SHOWN]})")
    if unexpected:
        problems.append(f"{len(unexpected)} row ids not in the corpus (first: {unexpected[:MISSING_SHOWN]})")
    if both:
        problems.append(f"{len(both)} rows both written and failed (first: {both[:MISSING_SHOWN]})")
    raise PrepareError(
        f"{shard_dir}: {n_rows} input rows, {len(written)} written + {len(failed)} failed: "
        f"{'; '.join(problems)}. {MANIFEST} was not written; run prepare again to resume the missing rows "
        "(or delete the folder and prepare again).")


def _counts(column: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in column.value_counts().sort_index().items()}


def _run_pipeline(ray, cfg: ExperimentConfig, spec: PreprocessSpec, rows: list[dict], label_names: list[str],
                  failed_dir: Path, target: Path, rows_per_file: int) -> None:
    """The Ray Data pipeline for rows of one modality: preprocess -> tokenize/embed -> Parquet."""
    n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(4 * n_cpus, len(rows) // 8)))
    counter = _row_counter(ray)
    ds = ds.map_batches(
        _preprocess_batch,
        batch_size=4,
        fn_kwargs={"spec": spec, "label_names": label_names, "failed_dir": str(failed_dir), "counter": counter},
    )
    ds = ds.map_batches(
        ReportEncoder,
        batch_size=64,
        fn_constructor_kwargs={"text_encoder": cfg.model.text_encoder, "max_tokens": spec.max_tokens,
                               "with_embeddings": spec.text_embeddings, "max_sentences": spec.max_sentences},
        compute=ray.data.ActorPoolStrategy(size=1),
        num_gpus=1 if cfg.cluster.use_gpu else 0,
        # fractional CPU: keeps Ray Data from fusing the volume tasks into this single actor
        num_cpus=0.5,
    )
    with _RowProgress(ray, counter, len(rows), f"prepare {target.name if target.name == 'xray' else 'ct'}"):
        ds.write_parquet(str(target), min_rows_per_file=rows_per_file, max_rows_per_file=rows_per_file)
    ray.kill(counter)


def _row_counter(ray):
    @ray.remote(num_cpus=0)
    class RowCounter:
        """Rows preprocessed and failed so far, told by the pipeline's tasks."""

        def __init__(self):
            self.done, self.failed = 0, 0

        def add(self, done: int, failed: int) -> None:
            self.done += done
            self.failed += failed

        def get(self) -> tuple[int, int]:
            return self.done, self.failed

    return RowCounter.remote()


class _RowProgress:
    """While the pipeline runs: a progress bar (rows done, failed, rate, ETA) on a terminal, else a
    log line every `LOG_EVERY_S` (a job's log on a cluster)."""

    POLL_S = 0.5
    LOG_EVERY_S = 30.0

    def __init__(self, ray, counter, total: int, desc: str):
        self.ray, self.counter, self.total, self.desc = ray, counter, total, desc
        self.stop = threading.Event()
        self.bar = logs.progress_bar(total, desc, unit="row")
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.started = time.time()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._update(final=True)
        self.bar.close()

    def _poll(self) -> None:
        last_log = time.time()
        while not self.stop.wait(self.POLL_S):
            done, failed = self._update()
            if self.bar.disable and time.time() - last_log >= self.LOG_EVERY_S:
                last_log = time.time()
                rate = (done + failed) / max(1e-9, time.time() - self.started)
                left = (self.total - done - failed) / rate if rate else float("nan")
                log.info(f"{self.desc}: {done + failed}/{self.total} rows ({failed} failed), {rate:.1f} rows/s"
                         + (f", ~{left / 60:.0f} min left" if left == left else ""))

    def _update(self, final: bool = False) -> tuple[int, int]:
        try:
            done, failed = self.ray.get(self.counter.get.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a progress bar never fails the pipeline
            return 0, 0
        if not self.bar.disable:
            self.bar.n = min(self.total, done + failed)
            self.bar.set_postfix(failed=failed, refresh=False)
            self.bar.refresh()
        return done, failed


def _readable_rows(path: Path) -> list[int] | None:
    """`row` ids of a complete Parquet file; None if it cannot be read (e.g. cut off mid-write)."""
    try:
        return [int(v) for v in pq.read_table(path, columns=["row"]).column("row").to_pylist()]
    except Exception:  # noqa: BLE001 - any unreadable file is redone
        return None


def _resumable_rows(shard_dir: Path, source_hash: str, spec_hash: str, progress) -> set[int] | None:
    """Row ids already written by an unfinished run on the same source; None: start afresh.

    Unreadable Parquet files are deleted (their rows are redone); a row found in two files (not
    written by this code, but cheap to guard) keeps its first file only.
    """
    marker = shard_dir / PROGRESS
    if not marker.is_file():
        return None
    try:
        state = json.loads(marker.read_text())
    except ValueError:
        return None
    if state.get("source_manifest_hash") != source_hash or state.get("spec_hash") != spec_hash:
        return None
    done: set[int] = set()
    for modality in MODALITIES:
        for name in shard_files(shard_dir, modality):
            path = Path(name)
            rows = _readable_rows(path)
            if rows is None or done.intersection(rows):
                progress(f"removing {'unreadable' if rows is None else 'duplicate'} shard file {path.name}")
                path.unlink()
                continue
            done.update(rows)
    return done


def _failed_rows(failed_dir: Path) -> set[int]:
    """Rows recorded as failed in `failed_dir`; a record cut off mid-write is deleted (row redone)."""
    rows = set()
    for path in failed_dir.glob("*.json"):
        try:
            rows.add(int(json.loads(path.read_text())["row"]))
        except (ValueError, KeyError, TypeError):
            path.unlink()
    return rows


def _written_summary(shard_dir: Path) -> pd.DataFrame:
    frames = [pq.read_table(name, columns=_SUMMARY_COLUMNS).to_pandas()
              for modality in MODALITIES for name in shard_files(shard_dir, modality)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in _SUMMARY_COLUMNS})
    return pd.concat(frames, ignore_index=True)
