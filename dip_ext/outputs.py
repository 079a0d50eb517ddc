"""Output and work folders that never endanger a user's files.

A command's results (a compacted model, its reports) go into an :class:`OutputFolder`: checked before any work
against every input and against the current folder, written into a staging folder beside the target, and moved
into place only once everything is written, so a failed or interrupted run leaves the previous output as it was.
Every folder dip_ext writes holds a marker (:data:`OUTPUT_MARKER`) listing the entries it wrote; ``overwrite``
replaces only such a folder, and only while it holds nothing else. Files dip_ext writes into a folder of the
user's (:func:`own_files`, e.g. ``PruneReport.save``) are recorded in that marker with their sha256, so it replaces
them later only while they are still what it wrote.

A run's checkpoints live in a work folder beside the output (:func:`default_work_dir`); :func:`prepare_work_dir`
removes from it only the checkpoints dip_ext names, and only from a folder dip_ext marked as its own
(:data:`WORK_MARKER`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

from .files import atomic_write_text, honour_umask
from .mixtures import mixture_files

__all__ = ["OUTPUT_MARKER", "WORK_MARKER", "OutputFolder", "check_not_input", "command_folders", "default_work_dir",
           "check_own_files", "own_files", "prepare_work_dir", "text_input_path", "text_input_paths", "text_inputs",
           "without_local_paths"]

PathLike = Union[str, os.PathLike]

#: the file in every output folder dip_ext wrote: which command wrote it and the entries it wrote
OUTPUT_MARKER = ".dip_ext-output.json"
#: the file in every work (checkpoint) folder dip_ext created
WORK_MARKER = ".dip_ext-work"
_STAGING_PREFIX = ".dip_ext-staging-"


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def text_input_path(spec) -> Optional[Path]:
    """The local file a text option reads (``"file:PATH"``), or None for a built-in text."""
    if isinstance(spec, str) and spec.startswith("file:") and len(spec) > len("file:"):
        return Path(spec[len("file:"):]).expanduser()
    return None


def text_input_paths(spec) -> list[Path]:
    """Every local file a text option reads: its ``file:`` entries, one for a plain ``file:PATH``, several for a
    text mixture (:mod:`dip_ext.mixtures`)."""
    return [p for p in (text_input_path(f) for f in mixture_files(spec)) if p is not None]


def text_inputs(option: str, spec) -> dict[str, Path]:
    """``{name: path}`` of the files the text option ``option`` (e.g. ``"--calibration"``) reads, for
    :func:`check_not_input`: the option's name for one file, the option and the file for each of a mixture's."""
    paths = text_input_paths(spec)
    return {option: paths[0]} if len(paths) == 1 else {f"{option} {p}": p for p in paths}


def check_not_input(folder: PathLike, what: str, inputs: Mapping[str, Optional[PathLike]],
                    outputs: Mapping[str, PathLike] = {}) -> Path:
    """Refuses (ValueError) a folder that dip_ext is about to write when it is the current folder or one of its
    parents, or is, contains or lies inside one of ``inputs`` (``{option name: local path or None}``; paths
    that do not exist, e.g. hub ids, are skipped) or one of the command's other ``outputs`` (whether they exist
    yet or not). Returns the folder resolved."""
    target = _resolved(folder)
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise ValueError(f"{what} {folder} is the current folder or one of its parents; name a new folder "
                         "(e.g. --out pruned)")
    named = [(f"the input {k}", v) for k, v in inputs.items() if v is not None and Path(v).expanduser().exists()]
    for label, path in named + [(f"the output {k}", v) for k, v in outputs.items()]:
        other = _resolved(path)
        if target == other or other in target.parents or target in other.parents:
            relation = "is" if target == other else "lies inside" if other in target.parents else "contains"
            raise ValueError(f"{what} {folder} {relation} {label} ({path}); write elsewhere")
    return target


def _marker(folder: Path) -> Optional[dict]:
    """The marker of ``folder`` (:data:`OUTPUT_MARKER`) as written by dip_ext, or None when it has none of ours."""
    try:
        meta = json.loads((folder / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("written_by") != "dip_ext" or not isinstance(meta.get("entries"), list):
        return None
    return meta


def _written_entries(folder: Path) -> Optional[list[str]]:
    """The entries the marker of ``folder`` lists, or None when it has no readable marker of ours."""
    meta = _marker(folder)
    return None if meta is None else [str(e) for e in meta["entries"]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _own_files(folder: Path) -> dict[str, str]:
    """``{name: sha256}`` of the files :func:`own_files` recorded in ``folder``'s marker (empty if none)."""
    files = (_marker(folder) or {}).get("sha256")
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}


def check_own_files(folder: PathLike, names: Iterable[str]) -> dict[str, str]:
    """FileExistsError naming the files among ``names`` already in ``folder`` that dip_ext may not replace (see
    :func:`own_files`); else the marker's record ``{name: sha256}`` of the files it wrote there."""
    folder = Path(folder)
    recorded = _own_files(folder) if folder.is_dir() else {}
    foreign = [n for n in names if (folder / n).exists() and recorded.get(n) != _sha256(folder / n)]
    if foreign:
        raise FileExistsError(f"{folder} already holds {', '.join(foreign)}, which dip_ext did not write (or which "
                              "changed since): it overwrites only its own files; save into another folder or move "
                              "them")
    return recorded


@contextmanager
def own_files(folder: PathLike, names: Iterable[str], *, command: str):
    """Writes the files ``names`` into ``folder`` (created if needed) inside the ``with`` block, and only if none
    of them is a file dip_ext did not write: FileExistsError naming them, before the block runs, for each already
    there unless the folder's :data:`OUTPUT_MARKER` records it with the content it still has (a file the user
    replaced or edited since is theirs). After the block the marker records what was written and its sha256, so a
    later call may replace them."""
    folder, names = Path(folder), list(names)
    recorded = check_own_files(folder, names)
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    recorded.update({n: _sha256(folder / n) for n in names if (folder / n).is_file()})
    entries = sorted(set(_written_entries(folder) or []) | set(recorded))
    atomic_write_text(folder / OUTPUT_MARKER, json.dumps(
        {"written_by": "dip_ext", "command": command, "entries": entries, "sha256": recorded}, indent=1) + "\n")


class OutputFolder:
    """The folder a command writes its results into, all at once.

    ``path``: the output folder; ``inputs``: ``{option name: path}`` of everything the command reads (the model,
    a teacher, text files): the output may not be, contain or lie inside any of them, nor be the current folder
    or a parent of it. An existing non-empty folder is refused unless ``replace`` is true, and then only when
    dip_ext wrote it (its :data:`OUTPUT_MARKER`) and it holds nothing but what dip_ext wrote. Every check runs
    in the constructor (ValueError naming the problem), before any work.

    Use::

        out = OutputFolder("pruned", command="prune", inputs={"--model": model_dir}, replace=overwrite)
        ...                                  # the run; nothing is written yet
        with out.staging() as folder:        # a new folder beside the target
            model.save_pretrained(folder)    # on an exception the staging folder is removed, the target untouched
        # here the target holds exactly what was written (and the marker)
    """

    def __init__(self, path: PathLike, *, command: str, inputs: Mapping[str, Optional[PathLike]] = {},
                 replace: bool = False, what: str = "output folder"):
        self.path = Path(path)
        self.command = command
        self.what = what
        self.target = check_not_input(self.path, what, inputs)
        if self.target.exists() and not self.target.is_dir():
            raise ValueError(f"{what} {path} exists and is not a folder")
        self.check_replaceable(replace)

    def existing_entries(self) -> list[str]:
        return sorted(p.name for p in self.target.iterdir()) if self.target.is_dir() else []

    def check_replaceable(self, replace: bool) -> None:
        """ValueError unless the target is absent, empty, or (with ``replace``) a folder dip_ext wrote holding
        nothing else."""
        present = self.existing_entries()
        if not present:
            return
        if not replace:
            raise ValueError(f"{self.what} {self.path} exists and is not empty; pass --overwrite to replace a "
                             "folder dip_ext wrote, or choose another folder")
        written = _written_entries(self.target)
        if written is None:
            raise ValueError(f"{self.what} {self.path} was not written by dip_ext (it has no {OUTPUT_MARKER}); "
                             "--overwrite replaces only dip_ext's own output: choose another folder")
        foreign = [e for e in present if e not in written and e != OUTPUT_MARKER]
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise ValueError(f"{self.what} {self.path} holds files dip_ext did not write ({shown}); "
                             "--overwrite would delete them: move them or choose another folder")

    def staging(self) -> "_Staging":
        """A context manager yielding a new, empty folder beside the target; on a clean exit it replaces the
        target (see the class docstring), on an exception it is removed."""
        return _Staging(self)

    def _commit(self, staged: Path) -> None:
        for path in staged.rglob("*"):  # what other libraries wrote may be owner-only whatever the umask
            if not path.is_symlink():
                honour_umask(path, directory=path.is_dir())
        entries = sorted(p.name for p in staged.iterdir() if p.name != OUTPUT_MARKER)
        atomic_write_text(staged / OUTPUT_MARKER, json.dumps(  # keeps own_files' record of what it wrote
            {"written_by": "dip_ext", "command": self.command, "entries": entries, "sha256": _own_files(staged)},
            indent=1) + "\n")
        try:
            self.check_replaceable(True)  # the target may have changed while the run ran
        except ValueError as e:  # the run's result is not lost: it stays beside the target under its own name
            n = 1
            while (kept := self.target.with_name(f"{self.target.name}.dip_ext-result-{n}")).exists():
                n += 1
            os.replace(staged, kept)
            raise ValueError(f"{e}; this run's result is kept in {kept}") from None
        old = None
        if self.target.exists():
            old = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=_STAGING_PREFIX + "old-"))
            os.replace(self.target, old / "previous")
        try:
            os.replace(staged, self.target)
        except BaseException:
            if old is not None:
                os.replace(old / "previous", self.target)
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old)  # the previous output: checked above to hold only what dip_ext wrote


class _Staging:
    def __init__(self, out: OutputFolder):
        self.out = out
        self.folder: Optional[Path] = None

    def __enter__(self) -> Path:
        self.out.target.parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(dir=self.out.target.parent,
                                            prefix=f"{_STAGING_PREFIX}{self.out.target.name}-"))
        honour_umask(self.folder, directory=True)
        return self.folder

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.out._commit(self.folder)
        finally:
            if self.folder.exists():  # failed, or the commit failed: nothing half-written stays behind
                shutil.rmtree(self.folder, ignore_errors=True)
        return False


def command_folders(out: PathLike, work_dir: Optional[PathLike], *, command: str,
                    inputs: Mapping[str, Optional[PathLike]], replace: bool,
                    main: bool = True) -> tuple[Optional[OutputFolder], Path]:
    """A command's :class:`OutputFolder` (checked and built on the ``main`` process only, None on the others,
    which never write it) and its work folder (``work_dir``, default :func:`default_work_dir`), refused like the
    output when it is an input, the current folder or a parent, and when it is, holds or lies inside the output.
    ValueError naming the problem, before any work."""
    folder = OutputFolder(out, command=command, inputs=inputs, replace=replace) if main else None
    work = Path(work_dir) if work_dir is not None else default_work_dir(out)
    check_not_input(work, "work folder", inputs, outputs={"--out": out})
    return folder, work


def default_work_dir(out: PathLike) -> Path:
    """The checkpoint folder of a run writing ``out``: ``<out>-work`` beside it (never inside: the output folder
    is what a user publishes)."""
    out = Path(out)
    return out.with_name(out.name + "-work")


def prepare_work_dir(work: PathLike, *, resume: bool, checkpoints: Iterable[str],
                     inputs: Mapping[str, Optional[PathLike]] = {}) -> Path:
    """Makes ``work`` ready for a run's checkpoints and returns it.

    With ``resume`` the folder is kept as it is (the stages continue from what they find). Without it, the
    entries named in ``checkpoints`` (files or folders, relative to ``work``) are removed so that no stage finds
    an older run's state, but only from a folder dip_ext created (its :data:`WORK_MARKER`); a non-empty folder
    without the marker is refused (ValueError), as is a work folder that is, contains or lies inside an input,
    or is the current folder or one of its parents.
    """
    work = Path(work)
    check_not_input(work, "work folder", inputs)
    if work.exists() and not work.is_dir():
        raise ValueError(f"work folder {work} exists and is not a folder")
    present = [p for p in work.iterdir()] if work.is_dir() else []
    if present and not (work / WORK_MARKER).exists() and not resume:
        shown = ", ".join(sorted(p.name for p in present)[:5])
        raise ValueError(f"work folder {work} is not empty and was not created by dip_ext ({shown}); choose a new "
                         "folder for the checkpoints (--work-dir)")
    work.mkdir(parents=True, exist_ok=True)
    if not (work / WORK_MARKER).exists():
        atomic_write_text(work / WORK_MARKER, "checkpoints of a dip_ext run\n")
    if not resume:
        for name in checkpoints:
            entry = work / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
    return work


def without_local_paths(value):
    """A copy of the JSON-like ``value`` (dicts, lists, strings, numbers) fit to publish: every string naming a
    local file or folder (``file:PATH``, or a path that exists here) is cut to its last component, in values and
    in keys alike."""
    if isinstance(value, dict):
        return {without_local_paths(k): without_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(without_local_paths(v) for v in value)
    if isinstance(value, str):
        entries = mixture_files(value)  # a plain file:PATH is a mixture of one entry
        for entry in entries:
            value = value.replace(entry, f"file:{Path(entry[len('file:'):]).name}")
        if entries:
            return value
        if (os.sep in value or value.startswith("~")) and Path(value).expanduser().exists():
            return Path(value).expanduser().resolve().name
    return value
