"""CSV manifests: one row per image, columns chosen by flags, or a known layout detected.

Layouts recognised when neither ``--path-col`` nor ``--label-col`` is given:

- HAM10000 metadata (``lesion_id,image_id,dx,dx_type,age,sex,localization``): path ``image_id``
  (``.jpg`` appended unless ``--ext``), label ``dx``, group ``lesion_id``, modality dermoscopy.
- ISIC 2018/2019 ground truth, one-hot (``image,MEL,NV,BCC,...`` with 0.0/1.0): the label is the
  column holding 1; path ``image`` with ``.jpg`` unless ``--ext``; modality dermoscopy.
- Otherwise columns named path/filepath/filename/file/image/image_path/image_id (path) and
  label/class/diagnosis/dx/target (label); ``split`` and ``group_id``/``patient_id`` when present.

Paths are relative to ``--image-root`` (default: the CSV's folder) and are resolved before they
become an image's key, so two spellings of one file are one image. A file missing there is also
looked for, by name, in the root's immediate subfolders, since HAM10000 ships its images in
``HAM10000_images_part_1/`` and ``..._part_2/`` and ISIC in ``ISIC2018_Task3_Training_Input/``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from vlmindex.datasets.base import Candidate, IngestOptions, Skip, normalise_split
from vlmindex.datasets.imagefolder import excluded
from vlmindex.errors import VlmindexError

PATH_NAMES = ("path", "filepath", "file_path", "filename", "file", "image", "image_path", "image_id")
LABEL_NAMES = ("label", "class", "diagnosis", "dx", "target")
SPLIT_NAMES = ("split",)
GROUP_NAMES = ("group_id", "group", "patient_id")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm",
              ".dcm"}
TRY_EXTS = (".jpg", ".png", ".jpeg")
SNIFF_ROWS = 50


@dataclass
class Layout:
    name: str
    path_col: str
    label_col: str | None = None
    split_col: str | None = None
    group_col: str | None = None
    modality_col: str | None = None
    onehot: list[str] = field(default_factory=list)   # class columns of a one-hot layout
    extension: str | None = None
    modality: str | None = None


def _pick(header: list[str], names: tuple[str, ...]) -> str | None:
    lower = {h.lower(): h for h in header}
    return next((lower[n] for n in names if n in lower), None)


def _is_binary(value: str) -> bool:
    try:
        return float(value) in (0.0, 1.0)
    except ValueError:
        return False


def detect_layout(header: list[str], sample: list[dict[str, str]], options: IngestOptions) -> Layout:
    """Choose the columns: explicit flags first, then HAM10000, ISIC one-hot, then common names."""
    lower = {h.lower() for h in header}
    explicit = options.path_col or options.label_col
    if not explicit and {"lesion_id", "image_id", "dx"} <= lower:
        cols = {h.lower(): h for h in header}
        layout = Layout("ham10000", cols["image_id"], cols["dx"], group_col=cols["lesion_id"],
                        extension=".jpg", modality="dermoscopy")
    elif (not explicit and header and header[0].lower() == "image" and len(header) >= 3 and sample
          and all(_is_binary(row.get(c) or "") for row in sample for c in header[1:])):
        layout = Layout("isic-onehot", header[0], onehot=list(header[1:]), extension=".jpg",
                        modality="dermoscopy")
    else:
        path_col = options.path_col or _pick(header, PATH_NAMES)
        if path_col is None:
            raise VlmindexError(
                f"no image path column found among {', '.join(header)}; name it with --path-col "
                "(and the class with --label-col)"
            )
        layout = Layout("columns", path_col, options.label_col or _pick(header, LABEL_NAMES))
        layout.split_col = _pick(header, SPLIT_NAMES)
        layout.group_col = _pick(header, GROUP_NAMES)
    # Flags always win over what a layout implies.
    for attr in ("split_col", "group_col", "modality_col"):
        if getattr(options, attr):
            setattr(layout, attr, getattr(options, attr))
    if options.extension:
        layout.extension = options.extension
    for attr in ("path_col", "label_col", "split_col", "group_col", "modality_col"):
        col = getattr(layout, attr)
        if col is not None and col not in header:
            flag = "--" + attr.replace("_", "-")
            raise VlmindexError(
                f"column {col!r} ({flag}) is not in the manifest; its columns are: {', '.join(header)}"
            )
    return layout


class _Resolver:
    """Finds the file a manifest value names, under the image root or one subfolder down."""

    def __init__(self, root: Path, extension: str | None) -> None:
        self.root = root
        self.extension = None if not extension else (
            extension if extension.startswith(".") else f".{extension}")
        self._by_name: dict[str, list[Path]] | None = None

    def tries(self, value: str) -> list[str]:
        if PurePosixPath(value).suffix.lower() in IMAGE_EXTS:
            return [value]
        if self.extension:
            return [value + self.extension]
        return [value, *(value + ext for ext in TRY_EXTS)]

    def _index(self) -> dict[str, list[Path]]:
        if self._by_name is None:
            self._by_name = {}
            try:
                subdirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
            except OSError:
                subdirs = []
            for d in subdirs:
                with os.scandir(d) as entries:
                    for e in entries:
                        if e.is_file() and not e.name.startswith("."):
                            self._by_name.setdefault(e.name, []).append(Path(e.path))
        return self._by_name

    def resolve(self, value: str) -> tuple[Path | None, str]:
        """(path, "") when found, else (None, why)."""
        names = self.tries(value)
        for name in names:
            p = Path(name) if Path(name).is_absolute() else self.root / name
            if p.is_file():
                return p, ""
        for name in names:
            if Path(name).is_absolute():
                continue
            found = self._index().get(PurePosixPath(name).name, [])
            if len(found) == 1:
                return found[0], ""
            if len(found) > 1:
                where = ", ".join(str(f.parent.name) for f in found)
                return None, f"ambiguous: {PurePosixPath(name).name} is in several subfolders ({where})"
        tried = ", ".join(names)
        return None, f"file not found under {self.root} (tried {tried}, also one subfolder down)"


def _dialect(path: Path, head: str) -> str:
    if path.suffix.lower() == ".tsv":
        return "\t"
    first = head.splitlines()[0] if head else ""
    counts = {d: first.count(d) for d in (",", ";", "\t")}
    return max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","


def scan(source: Path, options: IngestOptions, out_dir: Path) -> Iterator[Candidate | Skip]:
    """Yield one candidate per manifest row; rows whose file is missing become Skips."""
    if source.is_dir():
        raise VlmindexError(f"{source} is a folder; --format csv expects the manifest file itself")
    root = (options.image_root or source.parent).expanduser()
    if not root.is_dir():
        raise VlmindexError(f"image root {root} is not a folder; pass --image-root with the images' folder")
    try:
        with open(source, newline="", encoding="utf-8-sig") as fh:
            head = fh.read(65536)
            fh.seek(0)
            reader = csv.DictReader(fh, delimiter=_dialect(source, head))
            header = [h.strip() for h in (reader.fieldnames or [])]
            if not header:
                raise VlmindexError(f"manifest {source} is empty; it needs a header row")
            reader.fieldnames = header
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise VlmindexError(
            f"manifest {source} is not UTF-8 text ({exc.reason}); save it as UTF-8 CSV"
        ) from None
    except csv.Error as exc:
        raise VlmindexError(f"manifest {source} is not a readable CSV: {exc}") from None

    layout = detect_layout(header, rows[:SNIFF_ROWS], options)
    resolver = _Resolver(root, layout.extension)
    real_root = root.resolve()
    # Rows reaching one file by spellings _key cannot unify (a bare id and the file's path) share
    # the first row's key, so the driver sees a duplicate rather than a second image.
    key_of_file: dict[str, str] = {}
    for n, row in enumerate(rows, start=2):  # row 1 is the header, as a spreadsheet shows it
        where = f"{source}:{n}"
        value = (row.get(layout.path_col) or "").strip().replace("\\", "/")  # Windows-made manifests
        if not value:
            yield Skip(where, f"row {n} has no value in column {layout.path_col!r}")
            continue
        if options.exclude and excluded(value, options):
            continue
        path, why = resolver.resolve(value)
        if path is None:
            yield Skip(str(root / value), f"row {n}: {why}")
            continue
        if layout.onehot:
            label, why = _onehot_label(row, layout.onehot)
            if why:
                yield Skip(str(path), f"row {n} of {source.name}: {why}")
                continue
        else:
            label = _cell(row, layout.label_col)
        key = key_of_file.setdefault(os.path.realpath(path), _key(value, path, root, real_root))
        yield Candidate(
            path=path,
            key=key,
            label=label,
            split=normalise_split(_cell(row, layout.split_col)),
            group_id=_cell(row, layout.group_col) or options.group_of(path.name),
            modality=_cell(row, layout.modality_col) or options.modality or layout.modality,
            source_path=None,
        )


def _key(value: str, found: Path, root: Path, real_root: Path) -> str:
    """The image's identity: what ``value`` names, resolved, relative to the root when inside it.

    ``../x/a.png``, ``/abs/x/a.png`` and a path through a folder symlink give one key. A value the
    resolver had to complete (an id without extension, a file found one subfolder down) keeps its
    name as written and only its folder is resolved, so HAM10000's ``ISIC_0024306`` stays the key.
    """
    named = Path(value) if Path(value).is_absolute() else root / value
    completed = found != named
    real = Path(os.path.realpath(named.parent if completed else found))
    if completed:
        real /= named.name
    try:
        return real.relative_to(real_root).as_posix()
    except ValueError:
        return real.as_posix()


def _cell(row: dict[str, str], col: str | None) -> str | None:
    if col is None:
        return None
    value = (row.get(col) or "").strip()
    return value or None


def _onehot_label(row: dict[str, str], classes: list[str]) -> tuple[str | None, str]:
    try:
        hot = [c for c in classes if float(row.get(c) or 0) >= 0.5]
    except ValueError:
        return None, "a class column holds a value that is not a number"
    if len(hot) == 1:
        return hot[0], ""
    if not hot:
        return None, "no class column holds 1"
    return None, f"several class columns hold 1 ({', '.join(hot)})"
