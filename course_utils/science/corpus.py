"""The course corpus: a frozen snapshot of CPython 3.11.7's standard-library sources.

The text ships with the course (``assets/corpus/``: one deterministic ``.tar.gz``, the PSF licence
beside it), so every Python version, every machine and Colab read the same 665 files, the same
train / validation split and the same tokens that the course model was trained on. The
interpreter's own ``Lib/`` is read only when an author asks for it explicitly
(``list_files(root=...)``, ``python -m course_utils.assets freeze-corpus``).

Selection rules (applied when the snapshot was made): code, comments and docstrings; test suites,
installed third-party packages and generated files (build data, codec tables) are left out.
Files are in sorted order and split into train / validation by a hash of their relative path.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import sysconfig
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

#: The shipped snapshot, its licence, and the SHA-256 fingerprint the course model's card records
#: (``assets/course-2l/metadata.json`` -> ``corpus.fingerprint``; a test keeps the two equal).
CORPUS_DIR = Path(__file__).resolve().parents[1] / "assets" / "corpus"
ARCHIVE = CORPUS_DIR / "cpython-3.11.7-stdlib.tar.gz"
LICENSE = CORPUS_DIR / "LICENSE-PSF.txt"
FINGERPRINT = "3431b458244163f0e6ac05ad4f7e72101cbf2639e284eae6fa3fad2847a79b87"
SOURCE_PYTHON = "3.11.7"

#: Path components that mark a test suite or code that is not the standard library's own.
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "__phello__"}
)
#: Directory-name prefixes that hold build data rather than library code.
EXCLUDED_DIR_PREFIXES = ("config-",)
#: File-name prefixes of generated files.
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
#: A marker in the first lines of generated files (the ~70 charmap tables in encodings/, 1.3 MB of
#: escaped code points that would teach the model little Python or English).
GENERATED_MARKER = b"gencodec.py"

#: Percentage of files (by path hash) that go to the validation split.
VALIDATION_PERCENT = 5

#: The separator placed between files when they are joined into one stream.
END_OF_TEXT = "<|endoftext|>"

RESTORE_HINT = (
    "Restore it with `git checkout -- course_utils/assets/corpus` in the course repository, or "
    "reinstall the course package (`pip install --force-reinstall --no-deps course-utils`); the "
    "course never falls back to your interpreter's own standard library, whose files differ "
    "between Python versions."
)


class CorpusArchiveError(RuntimeError):
    """The shipped corpus archive is missing, truncated or not the snapshot the model saw."""


class StdlibSourcesMissingError(FileNotFoundError):
    """An explicit ``root`` holds no standard-library ``.py`` sources (stripped installs)."""


@dataclass(frozen=True)
class CorpusFile:
    relative_path: str  # POSIX path below the stdlib root, e.g. "json/decoder.py"
    data: bytes  # the file's bytes exactly as CPython ships them

    @property
    def split(self) -> str:
        return split_of(self.relative_path)

    def read(self) -> str:
        """The file as text (UTF-8, undecodable bytes replaced), with Unix newlines."""
        text = self.data.decode("utf-8", errors="replace")
        return text.replace("\r\n", "\n").replace("\r", "\n")


def stdlib_root() -> Path:
    """The running interpreter's standard library: used only to re-make the snapshot."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """'validation' for a fixed ~5% of files (chosen by SHA-256 of the relative path), else 'train'."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:4], "big") % 100
    return "validation" if bucket < VALIDATION_PERCENT else "train"


def fingerprint_of(files: Iterable[CorpusFile]) -> str:
    """SHA-256 over every (relative path, bytes) pair: identical corpus <=> identical hash."""
    digest = hashlib.sha256()
    for corpus_file in files:
        digest.update(corpus_file.relative_path.encode())
        digest.update(b"\0")
        digest.update(corpus_file.data)
        digest.update(b"\0")
    return digest.hexdigest()


# -- the shipped snapshot ---------------------------------------------------------------------
@lru_cache(maxsize=2)
def _read_archive(archive: Path) -> tuple[CorpusFile, ...]:
    """Every file of the archive, checked against FINGERPRINT (cached: read once per process)."""
    if not archive.is_file():
        raise CorpusArchiveError(f"the course corpus archive {archive} is missing. {RESTORE_HINT}")
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            files = []
            for member in tar:
                if not member.isfile():
                    continue
                handle = tar.extractfile(member)
                assert handle is not None  # a regular file always has contents
                files.append(CorpusFile(member.name, handle.read()))
    except (tarfile.TarError, OSError, EOFError) as error:
        raise CorpusArchiveError(
            f"the course corpus archive {archive} cannot be read ({type(error).__name__}: "
            f"{error}); it is truncated or corrupted. {RESTORE_HINT}"
        ) from None
    files.sort(key=lambda f: f.relative_path)
    found = fingerprint_of(files)
    if found != FINGERPRINT:
        raise CorpusArchiveError(
            f"the course corpus archive {archive} is not the snapshot the course model was "
            f"trained on (fingerprint {found[:12]}..., expected {FINGERPRINT[:12]}...; "
            f"{len(files)} files). {RESTORE_HINT}"
        )
    return tuple(files)


# -- an interpreter's own Lib/ (authors only: re-making the snapshot) --------------------------
def _excluded(relative: Path) -> bool:
    parts = relative.parts
    for part in parts[:-1]:
        if part in EXCLUDED_DIRS or part.startswith(EXCLUDED_DIR_PREFIXES):
            return True
    return parts[-1].startswith(EXCLUDED_FILE_PREFIXES)


def scan_stdlib(root: Path) -> list[CorpusFile]:
    """The corpus files under a standard-library folder, by the selection rules above."""
    root = Path(root)
    if not root.is_dir():
        raise StdlibSourcesMissingError(
            f"the standard library directory {root} does not exist, so no corpus can be read "
            "from it. (The course itself never needs this: it reads the shipped snapshot.)"
        )
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _excluded(relative) or not path.is_file():
            continue
        data = path.read_bytes()
        if GENERATED_MARKER in data[:300]:
            continue
        files.append(CorpusFile(relative.as_posix(), data))
    files.sort(key=lambda f: f.relative_path)
    if len(files) < 100 or not any(f.relative_path == "os.py" for f in files):
        raise StdlibSourcesMissingError(
            f"found only {len(files)} Python source files under {root}: its standard library "
            "sources (.py files) look stripped. Use a full Python install (python.org, pyenv, "
            "conda or the non-slim python Docker image)."
        )
    return files


def freeze(root: Path, archive: Path) -> str:
    """Write the corpus read from ``root`` as a byte-reproducible .tar.gz; return its fingerprint."""
    files = scan_stdlib(root)
    buffer = io.BytesIO()
    # Fixed owner, mode and time, sorted order, no file name or time in the gzip header: the same
    # sources always give the same bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for corpus_file in files:
                info = tarfile.TarInfo(corpus_file.relative_path)
                info.size, info.mode, info.mtime = len(corpus_file.data), 0o644, 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(corpus_file.data))
    Path(archive).parent.mkdir(parents=True, exist_ok=True)
    Path(archive).write_bytes(buffer.getvalue())
    return fingerprint_of(files)


# -- the API every chapter uses ---------------------------------------------------------------
def list_files(root: Path | None = None) -> list[CorpusFile]:
    """Every corpus file, sorted by relative path: the shipped snapshot, or ``root`` if given."""
    if root is not None:
        return scan_stdlib(root)
    return list(_read_archive(ARCHIVE))


def split_files(split: str, root: Path | None = None) -> list[CorpusFile]:
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
    return [f for f in list_files(root) if f.split == split]


def iter_texts(split: str, root: Path | None = None) -> Iterator[str]:
    """Yield the text of each file of ``split`` in the fixed order."""
    for corpus_file in split_files(split, root):
        yield corpus_file.read()


def corpus_fingerprint(root: Path | None = None) -> str:
    """SHA-256 over every (relative path, bytes) pair of the corpus (see ``fingerprint_of``)."""
    return fingerprint_of(list_files(root))


@dataclass(frozen=True)
class CorpusStats:
    files: dict[str, int]
    characters: dict[str, int]

    def __str__(self) -> str:
        return ", ".join(
            f"{split}: {self.files[split]} files, {self.characters[split]:,} characters"
            for split in ("train", "validation")
        )


def corpus_stats(root: Path | None = None) -> CorpusStats:
    files = {"train": 0, "validation": 0}
    characters = {"train": 0, "validation": 0}
    for corpus_file in list_files(root):
        files[corpus_file.split] += 1
        characters[corpus_file.split] += len(corpus_file.read())
    return CorpusStats(files, characters)
