"""Code, technical and legal text from installed packages, cut into documents of 256-512 tokens.

Sources (nothing downloaded but Debian's python3.11-doc, fetched with `apt-get download`):
- legal: the licences in /usr/share/common-licenses (GPL, LGPL, Apache-2.0, MPL, Artistic, BSD,
  CC0, GFDL) and every installed package's /usr/share/doc/*/copyright, paragraphs deduplicated
  (the same licence text recurs in hundreds of them). Licence texts are verbatim-copy licensed.
- code: the Python standard library's own sources (PSF licence).
- technical: the Python 3.11 documentation sources (reStructuredText, PSF documentation licence).

Each document gets a stable id (source, file, chunk) and a split: 1 in 20 ids is held out,
chosen by a hash of the file name, so no file has chunks on both sides.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

HELDOUT_ONE_IN = 20


@dataclass(frozen=True)
class Document:
    """One training document: where it comes from, which split, and its text."""

    id: str
    source: str
    split: str  # "train" or "heldout"
    text: str


def split_of(name: str) -> str:
    """The split of a file (stable across runs and machines)."""
    return "heldout" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELDOUT_ONE_IN == 0 else "train"


def chunk(tokenizer, text: str, target: int = 384, most: int = 512, least: int = 64) -> list[str]:
    """Cut at line ends into pieces of about `target` tokens (at most `most`; a tail under `least`
    tokens is dropped). A single line longer than `most` is cut by tokens."""
    pieces, lines, count = [], [], 0
    all_lines = text.splitlines(keepends=True)
    # One batched call: the fast tokenizer is far quicker on a list than line by line.
    encoded = tokenizer(all_lines, add_special_tokens=False)["input_ids"] if all_lines else []
    for line, ids in zip(all_lines, encoded):
        n = len(ids)
        if n > most:
            pieces += [tokenizer.decode(ids[i:i + target]) for i in range(0, len(ids), target)]
            continue
        if count + n > most and lines:
            pieces.append("".join(lines))
            lines, count = [], 0
        lines.append(line)
        count += n
        if count >= target:
            pieces.append("".join(lines))
            lines, count = [], 0
    if count >= least:
        pieces.append("".join(lines))
    return [p for p in pieces if p.strip()]


def licence_files() -> list[tuple[str, str]]:
    """(name, text) of the common licences and the packages' copyright files, paragraphs deduplicated."""
    files = sorted(Path("/usr/share/common-licenses").glob("*")) + sorted(Path("/usr/share/doc").glob("*/copyright"))
    seen: set[str] = set()
    out = []
    for path in files:
        if not path.is_file() or path.is_symlink():
            continue
        kept = []
        for paragraph in path.read_text(errors="replace").split("\n\n"):
            key = " ".join(paragraph.split())
            if len(key) > 40 and key not in seen:
                seen.add(key)
                kept.append(paragraph.strip("\n"))
        if kept:
            out.append((str(path), "\n\n".join(kept) + "\n"))
    return out


def python_sources() -> list[tuple[str, str]]:
    """(name, text) of the standard library's .py files (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/", "test/", "idlelib/idle_test/", "lib2to3/tests/")):
            continue
        out.append((f"stdlib/{rel}", path.read_text(errors="replace")))
    return out


def debian_package(name: str, cache_dir: Path) -> Path | None:
    """The files of Debian package `name`, fetched with `apt-get download` and unpacked once into
    cache_dir/name (the root of its file tree); None where apt-get cannot fetch it."""
    root = cache_dir / name
    if not root.exists():
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            fetched = subprocess.run(["apt-get", "download", name], cwd=tmp, capture_output=True)
            debs = list(Path(tmp).glob(f"{name}_*.deb"))
            if fetched.returncode != 0 or not debs:
                return None
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "root")], check=True)
            cache_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(tmp) / "root"), str(root))
    return root


def python_docs(cache_dir: Path) -> list[tuple[str, str]]:
    """(name, text) of the Python documentation's .rst sources; [] where apt-get cannot fetch them."""
    root = debian_package("python3.11-doc", cache_dir)
    if root is None:
        return []
    sources = root / "usr/share/doc/python3.11/html/_sources"
    return [(f"python-doc/{p.relative_to(sources).as_posix()}", p.read_text(errors="replace"))
            for p in sorted(sources.rglob("*.txt"))]


def documents(tokenizer, source: str, files: list[tuple[str, str]]) -> list[Document]:
    """The files of one source as documents of 256-512 tokens, each with its split."""
    docs = []
    for name, text in files:
        split = split_of(name)
        docs += [Document(f"{source}:{name}:{i}", source, split, piece)
                 for i, piece in enumerate(chunk(tokenizer, text))]
    return docs
