"""Output transactions: every command writes whole outputs or none.

A command plans each output path before any model loads (``Outputs.file`` / ``Outputs.folder`` /
``Outputs.targets``), which checks it: it is not empty and no name in it is over 255 bytes, its parent can be made and
written, a file is not a folder and a folder not a file, it is not an input (under any name), an output folder holds
no input, and no two outputs share a path. Work is then written into staging folders beside the
destinations; ``commit`` moves a set of files into place only once all of them exist (and none is an input), and
moves back what it had moved if one move fails; folders made for outputs that never came are removed on exit. A
folder output keeps a small manifest of the files textmask wrote there, so a run replaces its earlier files as a set
and never leaves a stale one beside the new (the user's own files are never touched).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import shutil
import tempfile
from pathlib import Path

from .errors import TextMaskError

MANIFEST = ".textmask.json"  # not STAGING_PREFIX: a finished folder holds no staging
STAGING_PREFIX = ".textmask-"
NAME_MAX = 255  # bytes in one file or folder name, on every common file system


def input_identity(path: Path) -> str:
    """An input file as a folder run remembers it: where it is, its size and its modification time, so a changed or
    replaced input (or another folder's of the same name) is masked again rather than kept."""
    st = Path(path).stat()
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def fit_stem(stem: str, suffix: str) -> str:
    """``stem`` cut at a character so that ``stem + suffix`` fits NAME_MAX bytes: a name made from an input's can
    outgrow the file system by what it adds."""
    room = NAME_MAX - len(os.fsencode(suffix))
    while len(os.fsencode(stem)) > room:
        stem = stem[: max(0, len(stem) - max(1, (len(os.fsencode(stem)) - room) // 4))]
    return stem


class OutputError(TextMaskError):
    """An output path that cannot be written, found before any work."""


def _writable_parent(path: Path, what: str, shown: Path | None = None) -> None:
    """The nearest existing ancestor of ``path`` is a folder that takes a new file (tried, not inferred from mode
    bits: root, ACLs and read-only mounts all answer differently); errors name ``shown`` (default ``path``)."""
    shown = shown or path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {what} {shown}: {parent} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise OutputError(f"cannot write {what} {shown}: {parent} is not writable ({e.strerror or type(e).__name__})") \
            from None


def _check_path(path: str | Path, what: str, name: str) -> Path:
    """``path`` as a Path, refused when empty (Path("") would be the current folder) or when a name in it is over
    NAME_MAX bytes."""
    if not str(path).strip():
        raise OutputError(f"{what} is an empty path; name a {name}")
    path = Path(path)
    long = [part for part in path.parts if len(os.fsencode(part)) > NAME_MAX]
    if long:
        raise OutputError(f"{what} has a name over {NAME_MAX} bytes ('{long[0][:40]}...'); shorten it")
    return path


def _identity(path: Path) -> tuple[int, int] | None:
    """The (device, inode) of an existing file or folder, the same under every name (a link, another spelling)."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def check_folder(path: str | Path, what: str) -> Path:
    """``path`` is a folder, or can be made as one, that takes new files; raises OutputError now otherwise."""
    path = _check_path(path, what, "folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file; name a folder")
    _writable_parent(path / "x", what, shown=path)  # a file in it, so the folder itself counts where it exists
    return path


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block ends (where the platform can hold them), so a set of moves or
    a clean-up is never cut in half; the signal arrives right after."""
    held = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Outputs:
    """One command's outputs. Use as a context manager: staging is removed on exit, whatever happened."""

    def __init__(self, inputs: list[Path] = ()):
        inputs = [Path(p) for p in inputs]
        self._inputs = {p.resolve() for p in inputs}
        self._input_ids = {_identity(p) for p in inputs} - {None}
        self._input_folders = {p.parent for p in self._inputs}
        self._input_folder_ids = {_identity(p) for p in self._input_folders} - {None}
        self._planned: dict[Path, str] = {}  # resolved path -> what it is
        self._folders: set[Path] = set()
        self._staging: dict[Path, Path] = {}  # destination folder -> its staging folder
        self._pending: list[tuple[Path, Path]] = []  # (staged file, destination) written but not yet moved
        self._trees: list[tuple[Path, Path]] = []  # (staging folder, destination folder)
        self._made: list[Path] = []  # folders this run made, removed on exit if nothing was committed into them

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, *exc) -> None:
        with signals_deferred():
            for stage in self._staging.values():
                shutil.rmtree(stage, ignore_errors=True)
            for folder in sorted(self._made, key=lambda f: len(f.absolute().parts), reverse=True):
                with contextlib.suppress(OSError):  # not empty: something was committed there
                    folder.rmdir()
        self._staging.clear()
        self._pending.clear()
        self._trees.clear()
        self._made.clear()

    # ---- planning: before any work -------------------------------------------------------------
    def _is_input(self, path: Path) -> bool:
        identity = _identity(path)
        return path.resolve() in self._inputs or (identity is not None and identity in self._input_ids)

    def _claim(self, path: Path, what: str) -> Path:
        resolved = path.resolve()
        if self._is_input(path):
            raise OutputError(f"{what} {path} is an input; choose another path")
        if resolved in self._planned:
            raise OutputError(f"{what} {path} is also the {self._planned[resolved]}; give each output its own path")
        self._planned[resolved] = what
        return resolved

    def file(self, path: str | Path, what: str = "output") -> Path:
        """Plan one output file; raises OutputError now if it cannot be written."""
        path = _check_path(path, what, "file")
        if path.is_dir():
            raise OutputError(f"{what} {path} is a folder; name a file")
        _writable_parent(path, what)
        self._claim(path, what)
        return path

    def folder(self, path: str | Path, what: str = "output folder") -> Path:
        """Plan one output folder; raises OutputError now if it cannot be written or holds an input, whose file names
        its outputs would share."""
        path = check_folder(path, what)
        identity = _identity(path)
        if path.resolve() in self._input_folders or (identity is not None and identity in self._input_folder_ids):
            raise OutputError(f"{what} {path} holds the inputs; choose another folder, so no input is written over")
        self._folders.add(self._claim(path, what))
        return path

    def targets(self, paths: list[Path], what: str = "output") -> None:
        """Plan the files a planned output folder will hold; raises OutputError now if one is an input, a folder, or
        another output's path (their folder was found writable already)."""
        for path in paths:
            path = _check_path(path, what, "file")
            if path.is_dir():
                raise OutputError(f"{what} {path} is a folder; move it away or choose another output folder")
            self._claim(path, what)

    # ---- writing: into staging ------------------------------------------------------------------
    def stage(self, destination: str | Path) -> Path:
        """Where to write ``destination``'s content now; ``commit`` moves it there."""
        destination = Path(destination)
        folder = destination.parent
        stage = self._staging.get(folder.resolve())
        if stage is None:
            self._mkdir(folder)
            stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
            self._staging[folder.resolve()] = stage
        # The suffix alone (writers choose the format by it): a whole name near the limit plus a prefix is over it.
        staged = stage / f"{len(self._pending)}{destination.suffix}"
        self._pending.append((staged, destination))
        return staged

    def stage_folder(self, destination: str | Path) -> Path:
        """A staging folder for a writer that fills a folder itself: ``commit`` moves its whole tree into
        ``destination``."""
        destination = Path(destination)
        self._mkdir(destination.parent)
        stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=destination.parent))
        self._staging[stage.resolve()] = stage
        self._trees.append((stage, destination))
        return stage

    def _mkdir(self, folder: Path) -> None:
        """Make ``folder`` and its missing parents, remembered so that exit removes those left empty."""
        for missing in (folder, *folder.parents):
            if missing.exists():
                break
            self._made.append(missing)
        folder.mkdir(parents=True, exist_ok=True)

    def commit(self) -> list[Path]:
        """Move every staged file into place and return the destinations; if a move fails, move back what was moved
        and raise OutputError. A destination that is an input is refused before anything moves."""
        for stage, destination in self._trees:
            self._pending += [(f, destination / f.relative_to(stage)) for f in sorted(stage.rglob("*")) if f.is_file()]
        self._trees.clear()
        pending, self._pending = self._pending, []
        inputs = [destination for _, destination in pending if self._is_input(destination)]
        if inputs:  # the last guard: planning refuses these before any work
            raise OutputError(f"{inputs[0]} is an input; nothing was written over it")
        with signals_deferred():
            return self._move(pending)

    def _move(self, pending: list[tuple[Path, Path]]) -> list[Path]:
        moved: list[tuple[Path, Path, Path | None]] = []  # (destination, staged, backup of what it replaced)
        try:
            for staged, destination in pending:
                if not staged.is_file():
                    raise OutputError(f"{destination} was not written")
                backup = None
                self._mkdir(destination.parent)
                if destination.exists():
                    backup = staged.with_name(staged.name + ".old")
                    os.replace(destination, backup)
                try:
                    os.replace(staged, destination)
                except OSError:
                    if backup is not None:
                        os.replace(backup, destination)
                    raise
                moved.append((destination, staged, backup))
        except OSError as e:
            for destination, staged, backup in reversed(moved):
                os.replace(destination, staged)
                if backup is not None:
                    os.replace(backup, destination)
            reason = e.strerror or type(e).__name__
            raise OutputError(f"cannot write {destination}: {reason}; nothing was changed") from None
        for _, _, backup in moved:
            if backup is not None:
                backup.unlink(missing_ok=True)
        return [destination for destination, _, _ in moved]


class FolderRun:
    """A folder of outputs written input by input: each input's files are moved into place as soon as they are all
    written, so a stopped run leaves only whole files, and a rerun with the same settings skips inputs whose files
    are all there (``done``). The manifest records, per settings fingerprint, which files textmask wrote; files of an
    earlier run with other settings, or of inputs no longer given, are removed once the run completes (``finish``),
    and a group's earlier files as soon as the group is rewritten (``record``)."""

    def __init__(self, folder: Path, settings: str, part: int | None = None):
        self.folder = Path(folder)
        self.settings = settings
        # One process of several (a sharded run) records its own part of the manifest; ``finish`` joins the parts.
        self.part = part
        old = self._read()
        same = old.get("settings") == settings
        self.files: set[str] = set(old.get("files", [])) if same else set()
        self.stale: set[str] = set(old.get("stale", [])) | (set() if same else set(old.get("files", [])))
        self.sources: dict[str, str] = dict(old.get("sources", {})) if same else {}  # name -> its input's identity
        self.produced: set[str] = set()

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob(".textmask.*.json"))

    def _read(self) -> dict:
        """The manifest, with the parts of an earlier sharded run (stopped before it merged them) joined in."""
        merged: dict = {}
        for path in [self.folder / MANIFEST, *self._parts()]:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(data, dict):
                continue
            if merged and data.get("settings") != merged.get("settings"):
                merged["stale"] = merged.get("stale", []) + data.get("files", [])
                continue
            sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
            merged = {"settings": data.get("settings"), "files": merged.get("files", []) + data.get("files", []),
                      "stale": merged.get("stale", []) + data.get("stale", []),
                      "sources": {**merged.get("sources", {}), **sources}}
        return merged

    def _write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = MANIFEST if self.part is None else f".textmask.{self.part}.json"
        tmp = self.folder / (name + ".tmp")
        data = {"settings": self.settings, "files": sorted(self.files), "stale": sorted(self.stale),
                "sources": {n: self.sources[n] for n in sorted(self.files) if n in self.sources}}
        if self.part is not None:
            data["produced"] = sorted(self.produced)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.folder / name)

    def _name(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.folder.resolve()).as_posix()

    def done(self, paths: list[Path], source: str | None = None) -> bool:
        """Whether this run's settings already wrote every one of ``paths``, from the input ``source`` names
        (``input_identity``) where given (then they are kept as they are)."""
        names = [self._name(p) for p in paths]
        if names and all(n in self.files and (self.folder / n).is_file()
                         and (source is None or self.sources.get(n) == source) for n in names):
            self.produced.update(names)
            return True
        return False

    def record(self, paths: list[Path], group: str | None = None, source: str | None = None) -> None:
        """``paths`` were just moved into place, made from the input ``source`` names where given. With ``group`` (a
        sub-folder, or "" for the whole folder), textmask's earlier files under it that are not among them go now, so
        a group never mixes two runs' files."""
        names = {self._name(p) for p in paths}
        if source is not None:
            self.sources.update(dict.fromkeys(names, source))
        if group is not None:
            prefix = group.rstrip("/") + "/" if group else ""
            self._remove({n for n in self.files | self.stale if n.startswith(prefix) and n not in names})
        self.files |= names
        self.stale -= names
        self.produced |= names
        self._write()

    def finish(self) -> None:
        """The run is complete (in a sharded run: every process's part, called by one process once all are done):
        textmask's files that no process wrote or kept go, and the manifest says so, in one file."""
        produced = set(self.produced)
        for path in self._parts():
            try:
                produced.update(json.loads(path.read_text()).get("produced", []))
            except (OSError, ValueError, AttributeError):
                pass
        old = self._read()
        known = set(old.get("files", [])) | set(old.get("stale", [])) | self.files | self.stale
        self._remove(known - produced)
        self.part = None
        self.files, self.stale = set(produced), set()
        if old.get("settings") == self.settings:  # every process's part, joined
            self.sources = {**old.get("sources", {}), **self.sources}
        self._write()
        for path in self._parts():
            path.unlink(missing_ok=True)

    def _remove(self, names: set[str]) -> None:
        root = self.folder.resolve()
        for name in names:
            path = (self.folder / name).resolve()
            if path.is_relative_to(root) and path.is_file():
                path.unlink()
                for parent in path.parents:  # folders the removal left empty
                    if parent == root or any(parent.iterdir()):
                        break
                    parent.rmdir()
            self.files.discard(name)
            self.stale.discard(name)
            self.sources.pop(name, None)
