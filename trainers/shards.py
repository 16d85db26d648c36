"""Splitting a command's items over processes and array-job shards, and joining their records.

``build-pairs``, ``annotate`` and ``evaluate`` each turn a list of items (prompts, images,
renders) into one JSON-lines record per item. This module is how they share that work:

- **Shares.** Under a launcher (``torchrun``, ``accelerate launch``: ``RANK``/``WORLD_SIZE`` in the
  environment) process r of W; with ``--shard I/N`` shard I of an array job; both at once: process
  r of shard I is share ``I*W + r`` of ``N*W``. Item k (its position in the command's own order)
  belongs to share ``k % count``: a pure function of the position, so every process knows every
  item's owner without talking to the others, and a shard started hours after another takes the
  same items. What an item produces (its seeds, its image names) depends on k only, never on the
  share, which is why a merged run equals a one-process run.
- **Part files.** A share appends each finished record to ``<output>.part-<i>-of-<n>.jsonl`` beside
  the output file, at once (a killed process loses only its items in flight). A share holds an
  exclusive lock on its part file: the same shard started twice at once is refused, not mixed in.
- **Resume.** The records in the output file and in every part file (of any earlier layout) count
  as done, so a rerun with any number of processes does only the rest.
- **Merge.** When every item has a record, the output file is rewritten atomically in the command's
  order and the part files are removed. In a process group rank 0 waits for the others by reading
  their part files as they grow (it reports the progress of all), then merges; shards of an array
  job are joined by the same command with ``--merge``, which refuses, naming the shard, when an item
  has no record or two shards recorded one item.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from core.fileio import EventTail, JsonlWriter, parse_jsonl, write_jsonl_atomic


class ShardError(RuntimeError):
    """A merge that would lose or mix records: a missing, incomplete or duplicated shard."""


def shard_spec(text: str) -> tuple[int, int]:
    """``--shard I/N``: shard I (0-based) of N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(match[1]), int(match[2])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--shard`` and ``--merge``: full names that no launcher's abbreviation parsing claims."""
    parser.add_argument("--shard", type=shard_spec, default=None, metavar="I/N",
                        help="do only shard I of N (0-based) and leave its records in a part file, for array jobs "
                             "without a process group; join the shards with the same command and --merge")
    parser.add_argument("--merge", action="store_true",
                        help="join the part files of finished shards into the output; does no work itself and "
                             "names any shard that is missing or incomplete")


@dataclass(frozen=True)
class Share:
    index: int = 0  # this process's share of ``count``
    count: int = 1
    rank: int = 0  # in the process group (0 without a launcher)
    world: int = 1
    shard: tuple[int, int] | None = None  # --shard I/N

    @classmethod
    def of(cls, shard: tuple[int, int] | None = None, environ=os.environ) -> "Share":
        rank, world = int(environ.get("RANK", "0")), int(environ.get("WORLD_SIZE", "1"))
        first, shards = shard or (0, 1)
        return cls(first * world + rank, shards * world, rank, world, shard)

    def owns(self, position: int) -> bool:
        return position % self.count == self.index

    def group_indices(self) -> range:
        """The shares of this process group (all ranks of this shard)."""
        start = self.index - self.rank
        return range(start, start + self.world)

    @property
    def reporter(self) -> bool:
        """The one process of the group that prints progress and merges."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process of the group (one gloo barrier; the group is let go at once, so
        no collective can time out during hours of work)."""
        if self.world <= 1:
            return
        import torch.distributed as dist

        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group("gloo")
        dist.barrier()
        if owned:
            dist.destroy_process_group()

    @staticmethod
    def device():
        """This process's device: its launcher's GPU (``cuda:LOCAL_RANK``) where CUDA is, else the CPU."""
        import torch

        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")

    def describe(self) -> str:
        parts = []
        if self.shard:
            parts.append(f"shard {self.shard[0]}/{self.shard[1]}")
        if self.world > 1:
            parts.append(f"process {self.rank} of {self.world}")
        return ", ".join(parts)


_PART = re.compile(r"\.part-(\d+)-of-(\d+)\.jsonl$")


class ShardedRecords:
    """One output file of JSON-lines records, one per item ``key``, written through part files.

    ``finished(record)``: whether an item is done for good (an ``error`` record is tried again);
    a finished record in a part file wins over an unfinished one, and two part files holding a
    finished record of one item are a duplicated shard."""

    def __init__(self, path: Path, share: Share, key: Callable[[dict], str] = None,
                 finished: Callable[[dict], bool] = lambda record: True):
        self.path, self.share = Path(path), share
        self.key = key
        self.finished = finished
        self.offsets: dict[Path, int] = {}
        self._lock = None

    def part(self, index: int, count: int | None = None) -> Path:
        """The journal of share ``index`` of ``count``; a lone process journals into the output
        file itself (as the commands always did: a watcher counting its lines sees every item)."""
        count = count or self.share.count
        return self.path if count == 1 else self.path.with_name(f"{self.path.stem}.part-{index}-of-{count}.jsonl")

    def parts(self) -> list[Path]:
        """Every part file of this output, of any layout, oldest first."""
        found = [p for p in self.path.parent.glob(f"{self.path.stem}.part-*-of-*.jsonl") if _PART.search(p.name)]
        return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def _read(self, path: Path) -> list[dict]:
        data = path.read_bytes() if path.is_file() else b""
        records, used = parse_jsonl(data, str(path), whole_file=False)
        self.offsets[path] = used  # where this run's new records start (a torn tail is cut there)
        for number, record in enumerate(records, 1):
            try:
                self.key(record)
            except (KeyError, TypeError):
                raise ShardError(f"{path}: record {number} has no key; fix or delete that line") from None
        return records

    def load(self) -> dict[str, dict]:
        """The latest record of every item in the output file and the part files (oldest first);
        a finished record is never replaced by an unfinished one (a failure retried elsewhere)."""
        records: dict[str, dict] = {}
        owner: dict[str, Path] = {}  # the part file whose finished record an item has
        for source in [self.path, *self.parts()]:
            for record in self._read(source):
                key = self.key(record)
                if not self.finished(record):
                    if key not in owner and not self.finished(records.get(key, record)):
                        records[key] = record
                    continue
                if key in owner and owner[key] not in (source, self.path):
                    raise ShardError(f"{key!r} was recorded by two shards, {owner[key].name} and {source.name}: "
                                     "a shard ran twice or two layouts of shards overlap; remove the part file of "
                                     "the run you do not want and merge again")
                records[key], owner[key] = record, source
        for index in self.share.group_indices():  # this run's part files may not exist yet
            self.offsets.setdefault(self.part(index), 0)
        return records

    def writer(self) -> JsonlWriter:
        """The journal of this share, locked for as long as this process lives."""
        path = self.part(self.share.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(path, "a")
        try:
            import fcntl

            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no advisory locks; array jobs run on POSIX clusters
            pass
        except OSError:
            raise ShardError(f"{path.name} is being written by another process: "
                             f"{self.share.describe() or 'this run'} is already running") from None
        return JsonlWriter(path)

    def check_complete(self, records: dict[str, dict], keys: list[str]) -> None:
        """Refuse a merge that would leave an item out, naming the shard that should have it."""
        missing = [(k, key) for k, key in enumerate(keys) if key not in records]
        if not missing:
            return
        layouts = sorted({int(m[2]) for p in self.parts() if (m := _PART.search(p.name))})
        if not layouts:
            raise ShardError(f"{len(missing)} of {len(keys)} items have no record and there is no part file of "
                             f"{self.path.name}: run the shards (--shard I/N) before --merge")
        count = layouts[-1]
        by_share: dict[int, list[str]] = {}
        for position, key in missing:
            by_share.setdefault(position % count, []).append(key)
        lines = []
        for index, keys_missing in sorted(by_share.items()):
            path = self.part(index, count)
            state = "did not run (no " + path.name + ")" if not path.is_file() else "is incomplete"
            lines.append(f"shard {index}/{count} {state}: {len(keys_missing)} item(s) without a record, "
                         f"e.g. {keys_missing[0]!r}")
        raise ShardError("; ".join(lines) + " — run those shards (again: a shard resumes) before --merge")

    def gathered(self) -> dict[str, dict] | None:
        """After ``work_share``: every record, for the process that merges (rank 0 of a run without
        ``--shard``); None for any other, which has nothing left to do."""
        if not self.share.reporter:
            return None
        if self.share.shard:
            print(f"shard {self.share.shard[0]}/{self.share.shard[1]} done; join the shards with the same command "
                  "and --merge")
            return None
        return self.load()

    def merge(self, ordered: list[dict]) -> None:
        """Write the output file in the command's order, atomically, then drop the part files."""
        write_jsonl_atomic(self.path, ordered)
        for part in self.parts():
            part.unlink(missing_ok=True)


class GroupProgress:
    """The reporting process's view of the whole group: items of ``keys`` that got a new record in
    any of the group's part files since ``load``. Other processes show nothing."""

    def __init__(self, store: ShardedRecords, keys: Iterable[str], desc: str, unit: str):
        from tqdm.auto import tqdm

        self.store, self.waiting = store, set(keys)
        self.tails = []
        for index in store.share.group_indices():
            tail = EventTail(store.part(index))
            tail.offset = store.offsets.get(tail.path, 0)
            self.tails.append(tail)
        self.bar = tqdm(total=len(self.waiting), desc=desc, unit=unit, disable=not store.share.reporter)

    def poll(self) -> None:
        if not self.store.share.reporter:
            return
        for tail in self.tails:
            for record in tail.read():
                self.waiting.discard(self.store.key(record))
        self.bar.n = self.bar.total - len(self.waiting)
        self.bar.refresh()

    def wait(self, poll_s: float = 0.5) -> None:
        """Until every item has its record (rank 0, once its own share is done)."""
        while self.store.share.reporter:
            self.poll()
            if not self.waiting:
                return
            time.sleep(poll_s)

    def close(self) -> None:
        self.bar.close()


def work_share(store: ShardedRecords, todo: list[tuple[int, str]], produce: Callable[[list[int]], Iterable[dict]],
               desc: str, unit: str, on_record: Callable[[dict], None] = lambda record: None) -> None:
    """Do this process's share of ``todo`` ((position, key) of the items not done): ``produce``
    gets the positions it owns and yields one record per item, journaled at once to the share's
    part file. The reporting process then waits for the rest of its group."""
    store.share.barrier()  # every process has read what is done before any writes
    writer = store.writer()
    ours = set(store.share.group_indices())  # the items of this process group (of this shard)
    progress = GroupProgress(store, [key for k, key in todo if k % store.share.count in ours], desc, unit)
    try:
        for record in produce([k for k, _ in todo if store.share.owns(k)]):
            writer.append(record)
            on_record(record)
            progress.poll()
        progress.wait()
    finally:
        progress.close()
