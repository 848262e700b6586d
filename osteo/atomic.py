"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

The data go to a temporary file with a unique name in the target's folder (so two writers of the
same file never share it), which replaces the target with ``os.replace`` only once everything is
written and flushed; on any error the temporary file is removed and the target is left as it was.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["AtomicFile", "atomic_write", "write_text_atomic"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: os.umask can only be read by setting it


class AtomicFile:
    """A file opened for writing in place of ``path``: ``commit()`` puts it there, ``discard()`` drops it.

    ``file`` is the open file object (``mode`` "w" or "wb", plus ``open`` keywords such as
    ``newline`` or ``encoding``); ``tmp`` its temporary path (``.<name>.<random><suffix>`` in the
    target's folder). As a context manager it commits on success and discards on an exception.
    """

    def __init__(self, path, mode: str = "w", suffix: str = ".tmp", **open_kw):
        self.target = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=suffix, dir=self.target.parent)
        self.tmp = Path(tmp)
        try:
            self.file = os.fdopen(fd, mode, **open_kw)
        except BaseException:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)
            raise

    def commit(self) -> Path:
        """Flush to disk and rename over the target (with the permissions ``open`` would give)."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 -> what open() would have given
            os.replace(self.tmp, self.target)
        except BaseException:
            self.discard()
            raise
        return self.target

    def discard(self) -> None:
        """Close and remove the temporary file; the target stays as it was."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write(path, mode: str = "w", **open_kw) -> AtomicFile:
    """``with atomic_write(path) as fh: ...``: ``path`` appears, complete, only when the block ends without error."""
    return AtomicFile(path, mode, **open_kw)


def write_text_atomic(path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return Path(path)
