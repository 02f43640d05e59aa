"""Image folders: ``[split/]class/image`` (BUSI, Kermany's chest X-rays, most Kaggle sets).

The class is the name of the folder holding the image; the split is the nearest enclosing folder
named train/val/test (or Training/Testing, ...). Everything that is not hidden is offered to the
ingest driver, which records files it cannot decode in ``skipped`` instead of dropping them.

    BUSI/benign/benign (1).png            label benign, no split  (--exclude '*_mask*' for masks)
    chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg
                                          label PNEUMONIA, split train, group person1 with
                                          --group-regex '^(person\\d+)_'
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from vlmindex.datasets.base import SPLIT_ALIASES, Candidate, IngestOptions, Skip, normalise_split
from vlmindex.errors import VlmindexError

# Archive and OS litter that is never data: recording it as "skipped" would only bury real losses.
IGNORED_DIRS = {"__MACOSX", "__pycache__"}


def excluded(rel: str, options: IngestOptions) -> bool:
    """True when a ``--exclude`` glob matches the relative path or the file name."""
    name = PurePosixPath(rel).name
    return any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(name, pat) for pat in options.exclude)


def walk_files(source: Path, options: IngestOptions) -> Iterator[tuple[Path, str] | Skip]:
    """Every non-hidden, non-excluded file under ``source`` as (path, relative posix path), sorted.

    A folder symlink whose target lies outside ``source`` is a Skip unless ``--follow-symlinks``:
    one stray link (to a home folder, a whole disk) would otherwise pull in unrelated files.
    """
    root = os.path.realpath(source)
    seen: set[str] = set()
    # Symlinked folders are followed (a split linked in from elsewhere in SOURCE), but each real
    # folder once, so a link back up the tree cannot loop.
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".") and d not in IGNORED_DIRS):
            link = os.path.join(dirpath, d)
            if not options.follow_symlinks and os.path.islink(link):
                target = os.path.realpath(link)
                if os.path.commonpath([root, target]) != root:
                    yield Skip(link, f"directory symlink to {target} leaves SOURCE; not followed "
                                     "(pass --follow-symlinks)")
                    continue
            keep.append(d)
        dirnames[:] = keep
        for fname in sorted(filenames):
            if fname.startswith("."):
                continue
            path = Path(dirpath) / fname
            rel = path.relative_to(source).as_posix()
            if not excluded(rel, options):
                yield path, rel


def folder_label_split(rel: str) -> tuple[str | None, str | None]:
    """(label, split) from a relative path: the parent folder is the class unless it is a split."""
    dirs = PurePosixPath(rel).parts[:-1]
    split = None
    for d in reversed(dirs):
        if d.lower() in SPLIT_ALIASES:
            split = normalise_split(d)
            break
    label = dirs[-1] if dirs and dirs[-1].lower() not in SPLIT_ALIASES else None
    return label, split


def scan(source: Path, options: IngestOptions, out_dir: Path) -> Iterator[Candidate | Skip]:
    """Yield one candidate per file under ``source``; ``out_dir`` is unused (nothing is converted)."""
    if not source.is_dir():
        raise VlmindexError(
            f"{source} is not a folder; --format imagefolder expects class folders "
            "(SOURCE/<class>/<image> or SOURCE/<split>/<class>/<image>)"
        )
    for item in walk_files(source, options):
        if isinstance(item, Skip):
            yield item
            continue
        path, rel = item
        label, split = folder_label_split(rel)
        yield Candidate(
            path=path,
            key=rel,
            label=label,
            split=split,
            group_id=options.group_of(path.name),
            modality=options.modality,
        )
