"""Where a sweep keeps its study, and which worker runs which trial.

The study lives in Optuna storage: by default a journal file in the study directory (no
server; many processes on one host, or on hosts sharing the directory, append to it), or any
database URL Optuna takes (`postgresql://...`). A trial's directory holds a lock file that its
runner holds (an advisory `flock`, released by the kernel when the runner dies, SIGKILL
included): a trial Optuna calls RUNNING whose lock is free was interrupted, and the worker that
takes the lock resumes it. The lock is the claim, so two workers never run one trial.
"""

from __future__ import annotations

import fcntl
import os
import pathlib

from jaxlm.errors import SweepError

JOURNAL = "journal.log"
LOCK = ".sweep.lock"


def trial_dir(study_dir: os.PathLike, number: int) -> pathlib.Path:
    return pathlib.Path(study_dir) / f"trial-{number:04d}"


def shown(url: str) -> str:
    """`url` with its password hidden, for messages and tables."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL: nothing secret to hide
        return url


def open_storage(url: str, study_dir: os.PathLike):
    """Optuna storage for `url` ("" = the journal file in `study_dir`); a URL that cannot be
    reached is one SweepError line naming --storage."""
    import optuna
    from optuna.storages import journal

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not url or url.startswith("journal:"):
        path = url[len("journal:") :] if url else os.path.join(study_dir, JOURNAL)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return journal.JournalStorage(journal.JournalFileBackend(path))
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except ImportError as e:
        raise SweepError(
            f"--storage={shown(url)}: its database driver is missing ({e}); "
            "pip install 'jaxlm[sweep]' (psycopg for postgresql://)"
        ) from None
    except Exception as e:  # sqlalchemy's errors for a bad URL, host, password, database
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SweepError(
            f"--storage={shown(url)}: cannot open it ({first[:300]}); check the URL and "
            "that the server is up"
        ) from None


class Claim:
    """This process's hold on one trial directory's lock; `None` from `take` if another
    process holds it. The file descriptor is handed to the trial's process, so the lock lasts
    while either lives."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def take(cls, directory: pathlib.Path) -> Claim | None:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return cls(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def is_held(directory: pathlib.Path) -> bool:
    """Whether some live process holds the trial directory's lock."""
    claim = Claim.take(directory) if directory.exists() else None
    if claim is None:
        return directory.exists()
    claim.release()
    return False
