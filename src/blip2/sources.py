"""Image datasets on disk, listed as items in a stable order: what `blip2 caption --input` labels (blip2.bulk)
and what `blip2 train` can read as `data.train` (parquet / datasets folders, blip2.train.data.TableDataset).

An `Item` is small and picklable (DataLoader workers receive it): a stable `key`, the `source` it came from, a
reference to its image bytes and, optionally, the text of that image (the question of `ask` / `instruct`, the
caption of a training pair) from `text_column`. Listing reads file names, tar headers and table columns of
strings only; image bytes are read later, by `ImageReader`, in the workers.

Inputs (`open_source`):
- a folder: every image file below it (recursive, common extensions), key = path relative to the folder;
- a text file (`.txt`, `.lst`): one image path per line (relative to the file's folder), key = the line;
- a JSONL file: one record per line with the image path in `image_column` (and the text in `text_column`);
- webdataset shards, a brace pattern (`dir/{00000..00099}.tar`, the img2dataset layout) or a glob: per sample
  KEY.jpg|png|webp|... (+ KEY.json / KEY.txt), key = `shard.tar/KEY`;
- parquet files (a `.parquet` file, a pattern or a folder of them) or a folder written by Hugging Face
  `datasets.Dataset.save_to_disk` (arrow files): `image_column` holds bytes, a path, or the `datasets` Image
  struct {bytes, path}; key = `key_column` if given, else `file:row`.
"""

from __future__ import annotations

import bisect
import glob
import io
import itertools
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_path", "path", "file_name")  # tried in this order


@dataclass(frozen=True)
class Item:
    key: str  # stable identity: relative path, shard/key or row id
    source: str  # the file it came from (image file, shard, parquet / arrow file)
    ref: tuple  # ("file", path) | ("tar", shard, offset, size) | ("table", file, format, row, column)
    text: str | None = None  # the image's own text (a question, an instruction, a caption) from text_column

    @property
    def path(self) -> Path | None:
        """The image file itself (folders, path lists, path columns), else None (bytes in a shard or table)."""
        return Path(self.ref[1]) if self.ref[0] == "file" else None


# ------------------------------------------------------------------------------------------ patterns


def expand_braces(pattern: str) -> list[str]:
    """`a{0..2}b{x,y}` -> a0bx a0by a1bx ...; numeric ranges keep the zero padding of their first bound."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end():], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1))
        options = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    return [s for o in options for s in expand_braces(head + o + tail)]


def expand_pattern(pattern: str) -> list[Path]:
    """Files named by a brace pattern and / or glob, in the pattern's order (globs sorted); missing ones are
    an error naming them."""
    out = []
    for p in expand_braces(pattern):
        if any(c in p for c in "*?["):
            out += [Path(x) for x in sorted(glob.glob(p))]
        else:
            out.append(Path(p))
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--input {pattern}: {len(missing)} file(s) not found, e.g. {missing[0]}")
    if not out:
        raise FileNotFoundError(f"--input {pattern}: the pattern matches no file")
    return out


# ------------------------------------------------------------------------------------------- listing


def table_files(spec: str | Path) -> tuple[list[Path], str] | None:
    """The parquet / arrow files a table input names and their format ("parquet" | "arrow"): a `.parquet` /
    `.arrow` file or pattern, a folder of parquet files (and no images), a saved `datasets` folder. None: not a
    table."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise ValueError(f"{path} is a datasets DatasetDict: name one split's folder, e.g. "
                             f"{path / (splits[0] if splits else 'train')}")
        if (path / "state.json").is_file():
            return _arrow_files(path), "arrow"
        parquet = sorted(path.rglob("*.parquet"))
        if parquet and not any(p.suffix.lower() in IMAGE_EXTS for p in path.rglob("*")):
            return parquet, "parquet"
        return None
    if not spec.lower().endswith((".parquet", ".arrow")):  # a pattern is expanded only when it names tables
        return None
    files = expand_pattern(spec) if re.search(r"[{*?\[]", spec) else [path]
    suffixes = {f.suffix.lower() for f in files}
    if files[0].is_file() and suffixes in ({".parquet"}, {".arrow"}):
        return files, suffixes.pop()[1:]
    return None


def table_rows(files: list[Path], fmt: str, columns: list[str]) -> list[dict]:
    """The given columns of every row of the tables, in row order ({column: value}; a column a file lacks is
    left out of its rows)."""
    rows = []
    for f in files:
        names = _schema(f, fmt).names
        rows += read_table(f, fmt, [c for c in columns if c in names]).to_pylist()
    return rows


def open_source(spec: str | Path, image_column: str | None = None, text_column: str | None = None,
                key_column: str | None = None) -> list[Item]:
    """The items of an `--input` in input order (see the module doc for what it may name)."""
    spec = str(spec)
    path = Path(spec)
    table = table_files(spec)
    if table is not None:
        return _table_items(*table, image_column, text_column, key_column)
    if path.is_dir():
        if text_column:
            raise ValueError(f"--input {path}: a folder of images has no text column; give one question for "
                             "all images, or a JSONL file / table with such a column")
        return _folder_items(path)
    files = expand_pattern(spec) if re.search(r"[{*?\[]", spec) else [path]
    if not files[0].is_file():
        raise FileNotFoundError(f"--input {spec}: no such file or folder")
    suffixes = {f.suffix.lower() for f in files}
    if suffixes == {".tar"}:
        return [it for f in files for it in _tar_items(f, text_column)]
    if len(files) == 1 and suffixes <= {".jsonl"}:
        return _jsonl_items(files[0], image_column or "image", text_column, key_column)
    if len(files) == 1 and suffixes <= {".txt", ".lst"}:
        if text_column:
            raise ValueError(f"--input {spec}: a list of paths has no text column; use a JSONL file")
        return _list_items(files[0])
    raise ValueError(f"--input {spec}: expected a folder, a .txt/.jsonl list, .tar shards, .parquet files or a "
                     f"saved datasets folder, got files ending in {sorted(suffixes)}")


def _folder_items(root: Path) -> list[Item]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [Item(p.relative_to(root).as_posix(), str(p), ("file", str(p))) for p in files]


def _list_items(listing: Path) -> list[Item]:
    items = []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        name = line.strip()
        if name and not name.startswith("#"):
            p = Path(name) if Path(name).is_absolute() else listing.parent / name
            items.append(Item(name, str(p), ("file", str(p))))
    return items


def _jsonl_items(listing: Path, image_column: str, text_column: str | None, key_column: str | None):
    items = []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{listing}:{n}: not JSON ({e})") from None
        for col in (image_column, text_column, key_column):
            if col and col not in rec:
                raise ValueError(f"{listing}:{n}: no field {col!r} (fields: {sorted(rec)})")
        name = str(rec[image_column])
        p = Path(name) if Path(name).is_absolute() else listing.parent / name
        key = str(rec[key_column]) if key_column else name
        items.append(Item(key, str(p), ("file", str(p)), _text(rec, text_column, f"{listing}:{n}")))
    return items


def _text(rec: dict, column: str | None, where: str) -> str | None:
    if column is None:
        return None
    v = rec.get(column)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{where}: field {column!r} must be a non-empty string, got {v!r:.60}")
    return v


def _tar_items(shard: Path, text_column: str | None) -> list[Item]:
    """Samples of one shard in file order: members grouped by KEY (the name up to the first dot)."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.isfile():
                    base = m.name.rsplit("/", 1)
                    stem, _, ext = base[-1].partition(".")
                    key = (base[0] + "/" + stem) if len(base) == 2 else stem
                    samples.setdefault(key, {})[ext.lower()] = m
            items = []
            for key, parts in samples.items():
                img = next((parts[e[1:]] for e in IMAGE_EXTS if e[1:] in parts), None)
                if img is None:
                    continue
                text = None
                if text_column:
                    text = _tar_text(tar, parts, text_column, f"{shard}/{key}")
                items.append(Item(f"{shard.name}/{key}", str(shard), ("tar", str(shard), img.offset_data, img.size),
                                  text))
    except tarfile.TarError as e:
        raise ValueError(f"{shard}: not a readable tar shard ({e})") from None
    return items


def _tar_text(tar, parts: dict, column: str, where: str) -> str:
    """A sample's text: the member KEY.<column> (e.g. txt), else field `column` of KEY.json."""
    if column in parts:
        return tar.extractfile(parts[column]).read().decode().strip()
    if "json" in parts:
        return _text(json.loads(tar.extractfile(parts["json"]).read()), column, where)
    raise ValueError(f"{where}: no {column!r} member and no .json with that field")


def _arrow_files(folder: Path) -> list[Path]:
    state = json.loads((folder / "state.json").read_text())
    names = [f["filename"] for f in state.get("_data_files", [])]
    if not names:
        raise ValueError(f"{folder / 'state.json'}: lists no _data_files")
    return [folder / n for n in names]


def _table_items(files: list[Path], fmt: str, image_column, text_column, key_column) -> list[Item]:
    items = []
    for f in files:
        schema = _schema(f, fmt)
        col = image_column or next((c for c in IMAGE_COLUMNS if c in schema.names), None)
        for c in (col, text_column, key_column):
            if c is not None and c not in schema.names:
                raise ValueError(f"{f}: no column {c!r} (columns: {schema.names})")
        if col is None:
            raise ValueError(f"{f}: no image column among {list(IMAGE_COLUMNS)}; name it with --image-column "
                             f"(columns: {schema.names})")
        small = [c for c in (text_column, key_column) if c]
        paths = _is_string(schema.field(col).type)
        table = read_table(f, fmt, small + ([col] if paths else []))
        keys = table.column(key_column).to_pylist() if key_column else None
        texts = table.column(text_column).to_pylist() if text_column else None
        names = table.column(col).to_pylist() if paths else None
        for row in range(table.num_rows):
            key = str(keys[row]) if keys else f"{f.name}:{row}"
            q = _text({text_column: texts[row]}, text_column, f"{f} row {row}") if texts else None
            if names is not None:
                p = Path(names[row]) if Path(names[row]).is_absolute() else f.parent / names[row]
                items.append(Item(key, str(p), ("file", str(p)), q))
            else:
                items.append(Item(key, str(f), ("table", str(f), fmt, row, col), q))
    return items


def _is_string(kind) -> bool:
    pa, _ = pyarrow_modules()
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _schema(f: Path, fmt: str):
    pa, pq = pyarrow_modules()
    if fmt == "parquet":
        return pq.read_schema(f)
    with pa.memory_map(str(f)) as src:
        return pa.ipc.open_stream(src).schema


def pyarrow_modules():
    """(pyarrow, pyarrow.parquet), or a clear error naming the extra that installs them."""
    try:  # deferred: pyarrow is needed only for tables, in and out (the `bulk` extra)
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"parquet / datasets files need pyarrow (pip install 'blip2[bulk]'): {e}") from None
    return pa, pq


def read_table(f: str | Path, fmt: str, columns: list[str] | None = None):
    """A whole parquet / arrow-stream file as a pyarrow Table (arrow files are memory-mapped, not read)."""
    pa, pq = pyarrow_modules()
    if fmt == "parquet":
        return pq.read_table(f, columns=columns)
    table = pa.ipc.open_stream(pa.memory_map(str(f))).read_all()
    return table.select(columns) if columns is not None else table


# ------------------------------------------------------------------------------------------ reading


class ImageReader:
    """Opens items' images; keeps the last table part it read (a worker reads consecutive rows of one file)."""

    def __init__(self):
        self._table = (None, None)  # (which file / column / row group, its cells)
        self._starts: dict[str, list[int]] = {}  # parquet file -> the end row of each row group

    def raw(self, item: Item) -> bytes | Path:
        """The image as stored: its file's path, or its bytes (from a shard or a table)."""
        kind = item.ref[0]
        if kind == "file":
            return Path(item.ref[1])
        if kind == "tar":
            _, shard, offset, size = item.ref
            with open(shard, "rb") as fh:
                fh.seek(offset)
                return fh.read(size)
        _, f, fmt, row, col = item.ref
        value = self._cell(f, fmt, row, col)
        if isinstance(value, dict):  # the datasets Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise ValueError(f"row {row} of {f} has no image in column {col!r}")
        return value if isinstance(value, bytes) else Path(f).parent / value

    def _cell(self, f: str, fmt: str, row: int, col: str):
        """One table cell. Parquet: only the row group holding the row is read (and kept for the next rows);
        arrow files are memory-mapped whole."""
        if fmt != "parquet":
            if self._table[0] != (f, col):
                self._table = ((f, col), read_table(f, fmt, [col]).column(col))
            return self._table[1][row].as_py()
        if self._starts.get(f) is None:
            _, pq = pyarrow_modules()
            meta = pq.ParquetFile(f).metadata
            sizes = (meta.row_group(g).num_rows for g in range(meta.num_row_groups))
            self._starts[f] = list(itertools.accumulate(sizes))
        group = bisect.bisect_right(self._starts[f], row)  # the first group whose end is past the row
        if self._table[0] != (f, col, group):
            _, pq = pyarrow_modules()
            self._table = ((f, col, group), pq.ParquetFile(f).read_row_group(group, columns=[col]).column(col))
        first = self._starts[f][group - 1] if group else 0
        return self._table[1][row - first].as_py()

    def read(self, item: Item) -> Image.Image:
        """The decoded image (not yet converted); raises with the reason when it cannot be read."""
        raw = self.raw(item)
        img = Image.open(io.BytesIO(raw) if isinstance(raw, bytes) else raw)
        img.load()  # decode now, so that a truncated file fails here
        return img
