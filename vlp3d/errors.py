"""The errors a command ends with, by exit code (the CLI maps them: vlp3d.jobs.common).

- exit 2, bad input: `InputError` (a ValueError; `vlp3d.config.ConfigError` is one) raised by vlp3d
  itself with a one-line reason naming the file, row or key and how to fix it; a user path that
  does not exist or cannot be read (FileNotFoundError, PermissionError, ...); a service that does
  not answer (ConnectionError: the cluster, the tracking server).
- exit 1, the work failed: an error with `exit_code = 1` (training diverged, ...).
- exit 3, an internal error: anything else (a ValueError from numpy, a KeyError, ...) is a bug in
  vlp3d: its traceback goes to a log file and the terminal gets one line saying where.

An error class may carry its own `exit_code` (FolderLockedError, ClusterAuthError: 2).
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input (arguments, config, files, corpus, model URI): the message says what, where and how
    to fix it. Exit 2."""

    exit_code = 2
