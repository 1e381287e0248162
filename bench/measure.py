"""Measuring: one command's wall time, CPU seconds and peak RSS, each tool's output checked, tools alternated."""

from __future__ import annotations

import hashlib
import os
import shlex
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common import KIB, MIB, BenchError, StoreMismatch, log
from dataset import NAMESPACE, TAG, Model, Profile, served_files
from host import HOST, OLLAMA_PULL, VENV_PYTHON, child_env
from peers import Tool, ollama_pull_command
from servers import Nginx


@dataclass(frozen=True)
class Measurement:
    wall: float
    cpu: float
    max_rss_kib: int
    exit_code: int
    timed_out: bool
    # The most the tool's processes held together, sampled every 20 ms: their private resident pages summed, and
    # the largest one's shared pages once. For one process it is its RSS, seen less often than wait4 sees it;
    # for a tool with helpers it can exceed every single process's peak.
    tree_kib: int = 0

    @property
    def memory_kib(self) -> int:
        """The figure the memory budget is held to: the peak RSS, or the process tree's if larger."""
        return max(self.max_rss_kib, self.tree_kib)


# Why a launcher: Linux carries a process's peak RSS across exec, and a child of this harness starts as a
# (v)fork of it, so its ru_maxrss would never read below the harness's own peak (tens of MiB), which hides
# what curl and aria2c really use. This small interpreter forks the tool itself, so the floor is its own
# small resident set (reported as "RSS floor" in the results), then waits with wait4 and writes what it saw.
# While it waits it samples the resident memory of the tool's process tree: wait4's peak is per process, and
# ollama-pull may run a helper process beside itself. From smaps_rollup, whose shared pages include those a
# forked helper still shares with its parent (statm counts them as each one's own, twice); it walks the page
# tables under the process's mmap lock, which slowed the tool when read every 5 ms, and not every 20 ms.
LAUNCHER = """
import os, signal, sys, time
def tree(pid):
    found = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            for child in handle.read().split():
                found += tree(int(child))
    except OSError:
        pass
    return found
def rollup(pid):
    private = shared = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    private += int(line.split()[1])
                elif line.startswith(("Shared_Clean:", "Shared_Dirty:")):
                    shared += int(line.split()[1])
    except (OSError, ValueError):
        return 0, 0
    return private, shared
def resident(pids):
    pages = [rollup(pid) for pid in pids]
    return sum(private for private, _ in pages) + max((shared for _, shared in pages), default=0)
result, timeout, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
timed_out = 0
def expire(signum, frame):
    global timed_out
    timed_out = 1
    os.kill(pid, signal.SIGKILL)
def stop(signum, frame):
    os.kill(pid, signal.SIGKILL)
    os._exit(143)
signal.signal(signal.SIGALRM, expire)
signal.signal(signal.SIGTERM, stop)
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
signal.setitimer(signal.ITIMER_REAL, timeout)
summed = ticks = 0
while True:
    try:
        done, status, usage = os.wait4(pid, os.WNOHANG)
    except InterruptedError:
        continue
    if done:
        break
    # Its end seen within 5 ms, its memory read every 20 ms.
    if ticks % 4 == 0:
        summed = max(summed, resident(tree(pid)))
    ticks += 1
    time.sleep(0.005)
wall = time.perf_counter() - started
signal.setitimer(signal.ITIMER_REAL, 0)
with open(result, "w") as handle:
    cpu = usage.ru_utime + usage.ru_stime
    handle.write(f"{wall} {cpu} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)} {timed_out} {summed}\\n")
"""


def measure(argv: Sequence[str], output: Path, timeout: float, env: dict[str, str] | None = None) -> Measurement:
    """Run ``argv`` to its end: wall time, and the child's own CPU time (user + system) and peak RSS (wait4)."""
    result = output.with_suffix(".measure")
    # The wall time is taken inside the launcher, from its fork to its wait4: its own start-up is not counted.
    launcher = [str(VENV_PYTHON), "-I", "-S", "-c", LAUNCHER, str(result), str(timeout), *argv]
    with open(output, "wb") as handle:
        process = subprocess.Popen(
            launcher,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**child_env(), **(env or {})},
        )
        try:
            process.wait(timeout + 60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise BenchError(f"the launcher of {argv[0]} did not end its child") from None
        finally:
            # Interrupted (Ctrl-C, SIGTERM): the launcher takes its tool down with it, nothing is left running.
            if process.returncode is None:
                process.terminate()
                process.wait()
    if process.returncode != 0 or not result.exists():
        raise BenchError(f"the launcher failed for {shlex.join(argv)}: {output.read_text(errors='replace')[-500:]}")
    wall, cpu, max_rss, exit_code, timed_out, summed = result.read_text().split()
    return Measurement(float(wall), float(cpu), int(max_rss), int(exit_code), timed_out == "1", int(summed))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def verify_store(models_dir: Path, model: Model, port: int) -> None:
    """Byte for byte: every blob hashes to its name and the manifest file is exactly what nginx served."""
    manifest = models_dir / "manifests" / f"{HOST}:{port}" / NAMESPACE / model.name / TAG
    if not manifest.is_file():
        found = sorted(str(p.relative_to(models_dir)) for p in models_dir.glob("manifests/**/*") if p.is_file())
        raise StoreMismatch(f"{model.name}: no manifest at {manifest}; the store has {found}")
    if manifest.read_bytes() != model.manifest:
        raise StoreMismatch(f"{model.name}: {manifest} differs from the manifest nginx serves")
    for blob in model.blobs:
        path = models_dir / "blobs" / f"sha256-{blob.hex}"
        if not path.is_file():
            raise StoreMismatch(f"{model.name}: blob {path.name} is missing")
        if path.stat().st_size != blob.size:
            raise StoreMismatch(f"{model.name}: {path.name} has {path.stat().st_size} bytes, not {blob.size}")
        actual = file_sha256(path)
        if actual != blob.hex:
            raise StoreMismatch(f"{model.name}: {path.name} hashes to sha256:{actual}")


def check_sizes(directory: Path, model: Model) -> str | None:
    """For peers: every file there with the right size (aria2c checks hashes itself; curl checks nothing)."""
    for blob in model.blobs:
        path = directory / f"sha256-{blob.hex}"
        if not path.is_file():
            return f"{path.name} missing"
        if path.stat().st_size != blob.size:
            return f"{path.name}: {path.stat().st_size} bytes, expected {blob.size}"
    return None


def run_timeout(model: Model, *, limited: bool) -> float:
    # Generous: a hung tool must end the run, a slow one must not. 2 MiB/s is 10x below one limited stream.
    return 120 + model.total_bytes / (2 * MIB if limited else 20 * MIB)


@dataclass
class Run:
    tool: str
    round: int
    measurement: Measurement
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class WorkloadResult:
    name: str
    model: Model
    tools: list[Tool]
    runs: list[Run] = field(default_factory=list)

    def of(self, tool: Tool, *, ok_only: bool = True) -> list[Run]:
        return [run for run in self.runs if run.tool == tool.key and (run.ok or not ok_only)]

    def median_wall(self, tool: Tool) -> float | None:
        runs = self.of(tool)
        return statistics.median(run.measurement.wall for run in runs) if runs else None

    def median_cpu(self, tool: Tool) -> float | None:
        runs = self.of(tool)
        return statistics.median(run.measurement.cpu for run in runs) if runs else None

    def peak_rss_mib(self, tool: Tool) -> float | None:
        # The peak of the peaks, not a median: the memory target is about the worst case.
        runs = self.of(tool)
        return max(run.measurement.memory_kib for run in runs) / KIB if runs else None

    def failures(self, tool: Tool) -> int:
        return len(self.of(tool, ok_only=False)) - len(self.of(tool))

    def paired_ratio(self, tool: Tool, peer: Tool) -> float | None:
        """Median over rounds of ollama-pull's wall time divided by the peer's in the same round.

        Runs of one round are seconds apart, so they share the machine's mood; pairing them cancels much
        of the noise a shared machine adds. Only rounds where both runs succeeded count.
        """
        mine = {run.round: run.measurement.wall for run in self.of(tool)}
        theirs = {run.round: run.measurement.wall for run in self.of(peer)}
        ratios = [mine[r] / theirs[r] for r in mine if r in theirs]
        return statistics.median(ratios) if ratios else None


def warm(paths: Sequence[Path]) -> None:
    """Read the files through the page cache, so that a run finds them there as the one before it did. This
    machine's kernel pages out file pages left unused for about a minute (a DAMON `pageout` scheme), so without
    it the first tool of a round could fetch a workload's blobs from disk through nginx where the others did
    not: with 4 MiB of a 1 GiB blob left in the cache, ollama-pull took 2.70 s (2.35 s of system time) against
    1.59 s once it was all there (bench/PROFILE.md)."""
    buffer = bytearray(MIB)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def empty_tree(root: Path) -> None:
    """Free a run's output as deleting it would (its data, its cached and dirty pages) but keep its files, which go
    with the scratch directory at the end. A pull that creates thousands of files right after thousands were
    deleted pays for the deletion: ext4 passes over an inode freed less than dirty_expire_centisecs (30 s) ago
    while its inode table block is still dirty, and looks at each one. 4,096 blobs of 64 KiB took 1.6-1.8 s with
    the previous run's files emptied, 3.3-5.4 s with them deleted (system time 0.6-0.8 -> 3.2-5.4 s, most of it
    in ext4's inode allocation), for every tool alike; no user's pull follows such a deletion (bench/PROFILE.md)."""
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.truncate(path, 0)


class Bench:
    def __init__(self, nginx: Nginx, scratch: Path, profile: Profile, runs: int) -> None:
        self.nginx = nginx
        self.scratch = scratch
        self.profile = profile
        self.runs = runs
        self.counter = 0

    def fresh_dir(self, label: str) -> Path:
        self.counter += 1
        # ollama-pull refuses a --models-dir whose parent is missing (a mistyped path): the parent is made here.
        (self.scratch / "out").mkdir(exist_ok=True)
        return self.scratch / "out" / f"{self.counter:04d}-{label}"

    def workload(self, name: str, model: Model, tools: list[Tool], *, limited: bool = False) -> WorkloadResult:
        result = WorkloadResult(name, model, tools)
        log(f"\n== {name}: {model.describe()}, {self.runs} rounds of {', '.join(t.key for t in tools)}")
        # Untimed, so that round 1's first tool starts where every later run does: just after a run of this
        # workload. After a workload of fewer bytes it wrote its output into memory the kernel had handed back to
        # the hypervisor (virtio-balloon free page reporting, a second or two after it is freed), whose first touch
        # costs about 1.7 s per GiB here: big's round 1 took ollama-pull 2.4-3.3 s against 1.6-2.4 s in the
        # rounds after it (bench/PROFILE.md).
        self.one_run(name, model, tools[0], 0, limited=limited)
        for round_index in range(1, self.runs + 1):
            for tool in tools:
                result.runs.append(self.one_run(name, model, tool, round_index, limited=limited))
        return result

    def one_run(self, name: str, model: Model, tool: Tool, round_index: int, *, limited: bool) -> Run:
        out = self.fresh_dir(f"{name}-{tool.key}")
        argv = tool.command(model, out, self.scratch, self.nginx.port)
        output = self.scratch / f"{out.name}.log"
        warm(served_files(self.nginx.root, model))
        # Start each run with no write-back pending from the previous one (emptied files have none left).
        os.sync()
        measurement = measure(argv, output, run_timeout(model, limited=limited), tool.env)
        error: str | None = None
        if measurement.timed_out:
            error = "timed out"
        elif measurement.exit_code != 0:
            error = f"exit code {measurement.exit_code}: {output.read_text(errors='replace')[-500:].strip()}"
        elif tool.is_ollama_pull:
            verify_store(out, model, self.nginx.port)  # raises StoreMismatch: that ends the benchmark, loudly
        elif tool.writes_store:
            try:
                verify_store(out, model, self.nginx.port)
            except StoreMismatch as exc:
                error = str(exc)
        else:
            error = check_sizes(out, model)
        # The page cache cannot be dropped reliably here; emptying the output right away at least keeps one
        # run's dirty pages and cached output from helping or hurting the next.
        empty_tree(out)
        m = measurement
        status = "ok" if error is None else f"FAILED ({error})"
        which = f"round {round_index}" if round_index else "warm-up"
        log(
            f"  [{name}] {which} {tool.key:14} {m.wall:7.2f} s wall {m.cpu:7.2f} s CPU "
            f"{m.memory_kib / KIB:7.1f} MiB  {status}"
        )
        return Run(tool.key, round_index, measurement, error)

    def rerun(self, model: Model, count: int) -> tuple[list[Measurement], int]:
        """A pull into a store that already has everything; also how many blob requests the re-runs made."""
        log(f"\n== rerun: {model.name} already present, {count} runs")
        out = self.fresh_dir("rerun")
        argv = ollama_pull_command(model, out, self.scratch, self.nginx.port)
        first = measure(argv, self.scratch / "rerun-0.log", run_timeout(model, limited=False))
        if first.exit_code != 0:
            raise BenchError(f"the first pull of the rerun test failed with exit code {first.exit_code}")
        verify_store(out, model, self.nginx.port)
        os.sync()
        # A fast re-run that quietly fetched blobs again would be a false pass: count what it asked nginx for.
        time.sleep(0.5)
        offset = self.nginx.log_offset()
        results = []
        for index in range(1, count + 1):
            m = measure(argv, self.scratch / f"rerun-{index}.log", 120)
            if m.exit_code != 0 or m.timed_out:
                raise BenchError(f"re-run {index} failed with exit code {m.exit_code}")
            log(f"  [rerun] run {index} {m.wall:6.3f} s wall {m.cpu:6.3f} s CPU {m.memory_kib / KIB:6.1f} MiB")
            results.append(m)
        time.sleep(0.5)
        blob_requests = sum(1 for line in self.nginx.read_log(offset) if "/blobs/" in line.uri)
        verify_store(out, model, self.nginx.port)
        empty_tree(out)
        return results, blob_requests

    def startup(self, count: int) -> tuple[list[Measurement], list[Measurement]]:
        """``ollama-pull --version``, alternating with a bare interpreter start for scale."""
        log(f"\n== version: {count} runs")
        version: list[Measurement] = []
        bare: list[Measurement] = []
        for index in range(1, count + 1):
            m = measure([str(OLLAMA_PULL), "--version"], self.scratch / "version.log", 60)
            if m.exit_code != 0:
                raise BenchError(f"ollama-pull --version failed with exit code {m.exit_code}")
            version.append(m)
            bare.append(measure([str(VENV_PYTHON), "-c", "pass"], self.scratch / "python.log", 60))
            log(f"  [version] run {index} {m.wall:6.3f} s wall (python -c pass: {bare[-1].wall:6.3f} s)")
        return version, bare

    def resume(self, model: Model, count: int) -> list[ResumeResult]:
        results = []
        log(f"\n== resume: {model.describe()}, killed at ~50%, {count} runs")
        blob = max(model.blobs, key=lambda b: b.size)
        for index in range(1, count + 1):
            # As before every run: a blob nginx reads from disk is slower than the link, and the first pull's
            # probe then splits it into chunks, which a resume re-downloads differently.
            warm(served_files(self.nginx.root, model))
            out = self.fresh_dir("resume")
            partial = out / "blobs" / f"sha256-{blob.hex}-partial"
            argv = ollama_pull_command(model, out, self.scratch, self.nginx.port)
            os.sync()
            with open(self.scratch / f"resume-{index}-killed.log", "wb") as handle:
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=child_env()
                )
            try:
                kill_half_way(process, partial, blob.size, time.monotonic() + run_timeout(model, limited=False))
            finally:
                # Whatever happened, the pull ends here: SIGKILL is the point of the test, and no leftover runs.
                if process.returncode is None:
                    process.kill()
                    _pid, status, _usage = os.wait4(process.pid, 0)
                    process.returncode = os.waitstatus_to_exitcode(status)
            had = landed_bytes(partial)
            # nginx logs the killed request when it notices the closed connection; let it, then mark the log.
            time.sleep(0.5)
            offset = self.nginx.log_offset()
            m = measure(argv, self.scratch / f"resume-{index}.log", run_timeout(model, limited=False))
            if m.exit_code != 0 or m.timed_out:
                raise BenchError(f"resume: the second pull failed with exit code {m.exit_code}")
            # The access log line is written when nginx finalises the request, a moment after the client has
            # every byte.
            time.sleep(0.5)
            lines = [line for line in self.nginx.read_log(offset) if line.uri.endswith(blob.digest)]
            verify_store(out, model, self.nginx.port)
            empty_tree(out)
            sent = sum(line.body_bytes for line in lines)
            result = ResumeResult(blob.size, had, sent, [line.range for line in lines], m)
            log(
                f"  [resume] run {index}: had {had / MIB:.1f} MiB, server sent {sent / MIB:.1f} MiB "
                f"(ranges {result.ranges}), re-downloaded {result.redownloaded / MIB:.2f} MiB = "
                f"{result.fraction:.2%} of what it had; {m.wall:.2f} s"
            )
            results.append(result)
        return results


def landed_bytes(partial: Path) -> int:
    """The bytes a partial file really holds. A blob downloaded in chunks is a sparse file whose size runs ahead
    of its contents, so count the allocated blocks (exact for data written in whole blocks, as chunks are)."""
    try:
        info = partial.stat()
    except FileNotFoundError:
        return 0
    return min(info.st_size, info.st_blocks * 512)


def kill_half_way(process: subprocess.Popen[bytes], partial: Path, size: int, deadline: float) -> None:
    """Return once the partial file holds half the blob; the caller then SIGKILLs the pull."""
    while True:
        pid, status, _usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            raise BenchError(f"resume: the first pull ended (exit {process.returncode}) before half way")
        if landed_bytes(partial) >= size // 2:
            return
        if time.monotonic() > deadline:
            raise BenchError("resume: the partial file never reached half the blob")
        # A short poll: at loopback speeds 1 ms is a few MB, a small overshoot past 50%.
        time.sleep(0.001)


@dataclass
class ResumeResult:
    size: int
    had: int
    sent: int
    ranges: list[str]
    second: Measurement

    @property
    def redownloaded(self) -> int:
        # Whatever the server sent beyond the missing part is bytes the client had and fetched again.
        return max(0, self.sent - (self.size - self.had))

    @property
    def fraction(self) -> float:
        return self.redownloaded / self.had if self.had else 1.0
