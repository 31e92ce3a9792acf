"""Files written whole or not at all: the catalogue, concepts.json, the reply cache, checkpoints and
captures are read back by the next run (or by a server), and a run stopped half-way through writing
one must leave the previous file in place, not a truncated one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_on_success(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (same file system, so the move is atomic) for the block to write;
    moved over `path` when the block finishes, removed when it raises."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
