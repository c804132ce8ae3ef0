"""<home>/inbox: files dropped there are ingested as `seal ingest FILE` would, then moved.

A file is taken once it has settled (unchanged for ``settle_s``); dotfiles, partial
downloads and subfolders are left alone, so the safe way to drop a file is to write
".name" and rename it to "name". A taken file goes to inbox/done/ (ingested, or a
duplicate) or inbox/failed/, with the reason in "<name>.reason.txt" beside it unless
it was ingested. A failure of the disk or the store leaves the file for the next poll.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..ingest import IngestError

log = logging.getLogger(__name__)

DONE, FAILED = "done", "failed"
# Names that say "still being written" (browsers, rsync, editors); dotfiles are skipped too.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".download", ".swp", "~")

# one file -> its documents, read exactly as `seal ingest FILE` reads it (IngestError if bad)
ReadFn = Callable[[Path], list]
# documents -> their outcomes, in one transaction (Store.ingest)
IngestFn = Callable[[list], list]


@dataclass(frozen=True)
class InboxResult:
    name: str
    outcome: str  # ingested | duplicate | failed
    detail: str
    moved_to: Path | None


class Inbox:
    def __init__(self, folder: Path, settle_s: float):
        self.folder, self.settle_s = folder, settle_s

    def poll(self, read: ReadFn, ingest: IngestFn, should_stop: Callable[[], bool] = lambda: False,
             doing: Callable[[str], None] = lambda _what: None) -> list[InboxResult]:
        """Take every settled file, in name order, until ``should_stop``; ``doing`` is
        told what is being ingested (and "idle" after each file)."""
        if should_stop() or not self.folder.is_dir():
            return []
        results = []
        for path in sorted(self.folder.iterdir()):
            if should_stop():
                break
            if not self.settled(path):
                continue
            doing(f"ingesting {path.name}")
            try:
                r = self.take(path, read, ingest)
            finally:
                doing("idle")
            if r is not None:
                results.append(r)
        return results

    def settled(self, path: Path) -> bool:
        if path.name.startswith(".") or path.name.endswith(PARTIAL_SUFFIXES):
            return False
        try:
            st = path.stat()
        except OSError:  # gone meanwhile, or a dangling link
            return False
        # mtimes are wall-clock time, whatever clock the daemon was given
        return stat.S_ISREG(st.st_mode) and time.time() - st.st_mtime >= self.settle_s

    def take(self, path: Path, read: ReadFn, ingest: IngestFn) -> InboxResult | None:
        """Ingest one file exactly as `seal ingest FILE` does (one transaction, same errors)."""
        try:
            (o,) = ingest(read(path))
        except IngestError as e:
            return self.file(path, "failed", str(e))
        except (OSError, sqlite3.Error) as e:  # the disk or the store, not the file: next poll
            log.warning("inbox: %s left for the next poll: %s", path.name, e)
            return None
        except Exception as e:
            log.exception("inbox: ingesting %s failed", path.name)
            return self.file(path, "failed", f"internal error: {type(e).__name__}: {e}")
        if o.status == "new" and o.passages_added:
            known = f", {o.passages_duplicate} already known" if o.passages_duplicate else ""
            return self.file(path, "ingested", f"{o.passages_added} passage(s){known}, {o.questions_added} question(s) queued")
        if o.duplicate_of:
            return self.file(path, "duplicate", f"duplicate: already ingested from {o.duplicate_of}; nothing queued")
        return self.file(path, "duplicate", "duplicate: every passage was already ingested; nothing queued")

    def file(self, path: Path, outcome: str, detail: str) -> InboxResult:
        """Move a taken file to done/ (ingested, duplicate) or failed/, the reason beside it."""
        folder = self.folder / (FAILED if outcome == "failed" else DONE)
        target = None
        try:
            folder.mkdir(exist_ok=True)
            target = _free_name(folder, path.name)
            os.replace(path, target)
            if outcome != "ingested":
                _write_private(target.with_name(target.name + ".reason.txt"), detail + "\n")
        except OSError as e:
            log.error("inbox: cannot move %s to %s: %s", path, folder, e)
        (log.warning if outcome == "failed" else log.info)("inbox: %s %s -> %s: %s", outcome, path.name,
                                                             folder.name, detail)
        return InboxResult(path.name, outcome, detail, target)


def _write_private(path: Path, text: str) -> None:
    """Write a new file (0600) that is never a planted symlink's target: a symlink at
    ``path`` is an OSError (ELOOP), not a write elsewhere."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _free_name(folder: Path, name: str) -> Path:
    target = folder / name
    n = 1
    while target.exists():
        n += 1
        p = Path(name)
        target = folder / f"{p.stem}-{n}{p.suffix}"
    return target
