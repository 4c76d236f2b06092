"""Status files that survive a crash and a second writer: atomic JSON writes, a folder lock, and
secret files created once (`create_secret_file`, the patient key).

Standard library only, so a Ray worker or a short-lived process imports it at no cost.

`write_json_atomic`: a reader sees the previous file or the complete new one, never a part of it
(temporary file in the same folder, flushed and fsynced, `os.replace`, folder fsynced). A process
killed mid-write leaves at most a hidden `.<name>.<pid>-<token>.tmp` file (`remove_temporaries`).

`FolderLock`: an exclusive `fcntl.flock` on a lock file. The kernel releases it when the holding
process ends, however it ends (SIGKILL included), so a lock left behind by a dead process never
blocks: the next run takes it over (with a warning naming the PID/host written inside). A held
lock fails at once with `FolderLockedError`. The holder unlinks the file on release; an acquirer
checks that the file it locked is still the one at the path (else it retries), so a release and a
new acquire cannot both hold "the" lock. The PID/host inside are only for messages; the lock file
is rewritten in place (replacing it would swap the locked inode). On a file system without
`flock` support (some FUSE/Lustre mounts: ENOLCK, EOPNOTSUPP, ENOSYS) the folder is used unlocked,
with a warning. Over NFS, Linux maps `flock` to NFS byte-range locks (lock server needed).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import time
from pathlib import Path

TEMPORARY_GLOB = ".*.tmp"
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


def write_json_atomic(path: str | Path, data, indent: int | None = None) -> None:
    """Write `data` as JSON to `path` atomically (see the module docstring); permissions as `open` gives."""
    path = Path(path)
    text = json.dumps(data, indent=indent)  # serialise first: a bad value leaves nothing behind
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open()
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_folder(path.parent)


def create_secret_file(path: str | Path, text: str) -> bool:
    """Write `text` to `path` readable by its owner only (0600) unless `path` exists: True when this
    call created it. Atomic: a reader never sees it half written, and of two concurrent callers one
    creates it and the other finds it (a hard link, unlike a rename, never replaces a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create in place
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_folder(path.parent)
    return True


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable; some file systems cannot fsync a folder (then the rename is still atomic)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(folder: str | Path) -> int:
    """Delete `write_json_atomic` temporaries left in `folder` by a killed writer; call it only while
    no other process writes there (e.g. under `FolderLock`). Returns how many were removed."""
    removed = 0
    for path in Path(folder).glob(TEMPORARY_GLOB):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock; the message says who and what to do."""

    exit_code = 2


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class FolderLock:
    """`with FolderLock(folder / "_prepare.lock", "prepare"):` - exclusive use of `folder` (module docstring).

    `what` names the work in messages; `warn(message)` receives the take-over / no-locking warnings.
    """

    def __init__(self, path: str | Path, what: str = "prepare", warn=print):
        self.path = Path(path)
        self.what = what
        self.warn = warn
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(20):  # a retry only follows a concurrent release: a handful at most
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise FolderLockedError(self._held_message(holder)) from None
            except OSError as err:
                os.close(fd)
                if err.errno not in _NO_LOCKING:
                    raise
                self.warn(f"{self.path.parent}: this file system does not support locks ({err.strerror}); "
                          f"running {self.what} without a lock: do not start a second {self.what} into this folder")
                return
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is None or not os.path.samestat(os.fstat(fd), current):
                os.close(fd)  # locked a file its holder just unlinked on release: lock the new one
                continue
            previous = _read_holder(fd)
            if previous:
                self.warn(self._takeover_message(previous))
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                      "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return
        raise FolderLockedError(f"{self.path}: could not lock it (it kept being replaced); try again")

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    self.path.unlink()  # while still locked: see the module docstring
        finally:
            os.close(fd)  # releases the flock

    def _held_message(self, holder: dict) -> str:
        who = _describe(holder)
        return (f"{self.path.parent} is in use by another {self.what}: its lock file {self.path} is held by {who}. "
                f"Two runs writing one folder would corrupt it. Wait for that run to finish and run again, or, "
                f"if that process is gone, delete {self.path} and run again.")

    def _takeover_message(self, holder: dict) -> str:
        pid, host = holder.get("pid"), holder.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            state = f"PID {pid} is no longer running on this host"
        else:
            state = "its lock was released without removing the file"
        return (f"taking over {self.path}, left behind by {_describe(holder)}: {state} "
                "(killed or crashed)")


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that has not written its PID yet"
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"
