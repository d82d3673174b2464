"""The course corpus: the Python standard library's own source files, read at run time.

Nothing of it is committed: the text comes from the running interpreter's installation
(``sysconfig.get_paths()["stdlib"]``). Code, comments and docstrings; test suites, installed
third-party packages and generated files (build data, codec tables) are left out. Files are read in a fixed sorted
order and split into train / validation by a hash of their path relative to the stdlib root,
so every machine with the same Python version gets the same two lists.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

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


class StdlibSourcesMissingError(FileNotFoundError):
    """The interpreter was installed without its ``.py`` sources (some minimal images do this)."""


@dataclass(frozen=True)
class CorpusFile:
    relative_path: str
    path: Path

    @property
    def split(self) -> str:
        return split_of(self.relative_path)

    def read(self) -> str:
        return read_source(self.path)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """'validation' for a fixed ~5% of files (chosen by SHA-256 of the relative path), else 'train'."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:4], "big") % 100
    return "validation" if bucket < VALIDATION_PERCENT else "train"


def _excluded(relative: Path) -> bool:
    parts = relative.parts
    for part in parts[:-1]:
        if part in EXCLUDED_DIRS or part.startswith(EXCLUDED_DIR_PREFIXES):
            return True
    return parts[-1].startswith(EXCLUDED_FILE_PREFIXES)


def list_files(root: Path | None = None) -> list[CorpusFile]:
    """Every corpus file under the stdlib root, sorted by relative POSIX path."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise StdlibSourcesMissingError(
            f"the standard library directory {root} does not exist, so the course corpus cannot be "
            "read. Use a full Python install (python.org, pyenv, conda or the python:3.11 Docker "
            "image, not a '-slim'/distroless one)."
        )
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _excluded(relative) or not path.is_file():
            continue
        with path.open("rb") as handle:
            if GENERATED_MARKER in handle.read(300):
                continue
        files.append(CorpusFile(relative.as_posix(), path))
    files.sort(key=lambda f: f.relative_path)
    if len(files) < 100 or not any(f.relative_path == "os.py" for f in files):
        raise StdlibSourcesMissingError(
            f"found only {len(files)} Python source files under {root}: this interpreter's standard "
            "library sources (.py files) look stripped, so the course corpus cannot be built. "
            "Install a full Python (python.org, pyenv, conda or the non-slim python Docker image)."
        )
    return files


def read_source(path: Path) -> str:
    """A source file as text (UTF-8, undecodable bytes replaced), with Unix newlines."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_files(split: str, root: Path | None = None) -> list[CorpusFile]:
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
    return [f for f in list_files(root) if f.split == split]


def iter_texts(split: str, root: Path | None = None):
    """Yield the text of each file of ``split`` in the fixed order."""
    for corpus_file in split_files(split, root):
        yield corpus_file.read()


def corpus_fingerprint(root: Path | None = None) -> str:
    """SHA-256 over every (relative path, contents) pair: identical corpus <=> identical hash."""
    digest = hashlib.sha256()
    for corpus_file in list_files(root):
        digest.update(corpus_file.relative_path.encode())
        digest.update(b"\0")
        digest.update(corpus_file.path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


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
