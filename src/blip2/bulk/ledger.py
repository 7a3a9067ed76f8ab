"""Exactly-once bookkeeping and the output files of a bulk run.

The items are cut into chunks of `chunk_size` consecutive items; chunk c belongs to process c % world_size.
When a chunk is finished its results are written, atomically, as one part file `chunk-NNNNNN.jsonl` in the
run's parts folder (`OUT.parts/`). A restarted run reads which parts exist and does only the missing chunks, so
nothing is lost or written twice; `meta.json` in the same folder holds the settings, and a restart with other
settings (or another input) is refused. When every part exists, they are merged in input order into OUT
(`.jsonl` or `.parquet`), `OUT.failed.jsonl` and `OUT.meta.json`, and the parts folder is removed.

Part records: {"i": item index, "key", "source", "text" [, "question"]} or {"i", "key", "source", "error"}
(the image could not be read) or {"i", "key", "source", "skipped": true} (sidecar mode: a .txt existed).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..files import atomic_file, write_text_atomic
from ..sources import Item, pyarrow_modules

OUTPUT_FIELDS = ("key", "source", "text", "question")


def keys_digest(items: list[Item]) -> str:
    """A digest of the input's keys, sources and questions, in order: a restart must see the same input."""
    h = hashlib.blake2b(digest_size=16)
    for it in items:
        h.update(json.dumps([it.key, it.source, it.text]).encode() + b"\n")
    return h.hexdigest()


class Ledger:
    """The parts folder of one run: which chunks are done, writing a chunk, merging them."""

    def __init__(self, parts: Path, n_items: int, chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.parts, self.n_items, self.chunk_size = Path(parts), n_items, chunk_size
        self.n_chunks = -(-n_items // chunk_size)

    def chunk_range(self, c: int) -> range:
        return range(c * self.chunk_size, min((c + 1) * self.chunk_size, self.n_items))

    def part(self, c: int) -> Path:
        return self.parts / f"chunk-{c:06d}.jsonl"

    def start(self, meta: dict) -> None:
        """Create the parts folder with `meta`, or check that an existing one was written with the same."""
        meta_file = self.parts / "meta.json"
        if meta_file.is_file():
            old = json.loads(meta_file.read_text())
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                raise ValueError(f"{self.parts} holds an unfinished run with other settings ({', '.join(diff)} "
                                 "differ): rerun with the same command to finish it, or delete that folder")
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        write_text_atomic(meta_file, json.dumps(meta, indent=2))

    def done(self) -> set[int]:
        return {c for c in range(self.n_chunks) if self.part(c).is_file()}

    def pending(self, rank: int, world: int) -> list[int]:
        done = self.done()
        return [c for c in range(rank, self.n_chunks, world) if c not in done]

    def write(self, c: int, records: list[dict]) -> None:
        records = sorted(records, key=lambda r: r["i"])
        if [r["i"] for r in records] != list(self.chunk_range(c)):
            raise RuntimeError(f"chunk {c}: results for items {[r['i'] for r in records]} do not cover "
                               f"{self.chunk_range(c)}")
        with atomic_file(self.part(c)) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def complete(self) -> bool:
        return len(self.done()) == self.n_chunks

    def records(self):
        """Every part's records, in input order."""
        for c in range(self.n_chunks):
            for line in self.part(c).read_text().splitlines():
                yield json.loads(line)

    def remove(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def failed_file(output: Path) -> Path:
    return output.with_name(output.stem + ".failed.jsonl")


def meta_file(output: Path) -> Path:
    return output.with_name(output.stem + ".meta.json")


def merge(ledger: Ledger, output: Path | None, meta: dict, failed: Path) -> dict:
    """Write the merged outputs (OUT unless sidecar-only, the failed list, OUT.meta.json); returns the counts."""
    rows, errors, skipped = [], [], 0
    for r in ledger.records():
        if "error" in r:
            errors.append({"key": r["key"], "source": r["source"], "error": r["error"]})
        elif r.get("skipped"):
            skipped += 1
        else:
            rows.append({k: r[k] for k in OUTPUT_FIELDS if k in r})
    if output is not None:
        if output.suffix == ".parquet":
            _write_parquet(output, rows)
        else:
            with atomic_file(output) as tmp:
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    with atomic_file(failed) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in errors))
    counts = {"done": len(rows), "failed": len(errors), "skipped": skipped}
    if output is not None:
        write_text_atomic(meta_file(output), json.dumps({**meta, **counts}, indent=2))
    return counts


def _write_parquet(path: Path, rows: list[dict]) -> None:
    pa, pq = pyarrow_modules()
    fields = [k for k in OUTPUT_FIELDS if any(k in r for r in rows)] or ["key", "source", "text"]
    table = pa.table({k: pa.array([r.get(k) for r in rows], type=pa.string()) for k in fields})
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
