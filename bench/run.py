#!/usr/bin/env python3
"""Benchmark ollama-pull against aria2c and curl, all pulling from nginx on 127.0.0.1.

One command: ``python bench/run.py`` (``--quick`` for a smoke run of about a minute). See bench/README.md.

nginx serves a registry laid out as static files (``/v2/<ns>/<model>/manifests/<tag>`` and
``/v2/<ns>/<model>/blobs/sha256:<hex>``), so every tool talks to the same cheap, well-understood server and
the comparison measures the clients. Tools run in alternation (A1, B1, C1, A2, B2, ...) so that noise from the
shared machine lands on every tool alike, and ratios are taken between runs of the same round.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script (python bench/run.py), so its own directory is on sys.path and its modules import by name.
from common import KIB, MIB, BenchError, StoreMismatch, log
from dataset import (
    FULL,
    NAMESPACE,
    QUICK,
    TAG,
    Model,
    Profile,
    Tree,
    build_tree,
)
from host import (
    BENCH_DIR,
    HOST,
    OLLAMA_PULL,
    REPO,
    VENV_PYTHON,
    child_env,
    ensure_programs,
    program_version,
)
from peers import (
    ARIA2,
    CURL_PARALLEL,
    CURL_SINGLE,
    GO,
    GO_DEFAULT_STREAMS,
    GO_MANY_STREAMS,
    GO_PEER_VARIABLE,
    GO_WIDE,
    OLLAMA,
    Tool,
    ollama_pull_command,
)
from servers import LIMIT_RATE, LIMIT_RATE_BYTES, Nginx

MEMORY_TARGET_MIB = 100.0
ALL_WORKLOADS = ("tensors", "many", "many-limited", "big", "big-limited", "scaling", "rerun", "version", "resume")


# ------------------------------------------------------------------------------------------------ measurement


@dataclass(frozen=True)
class Measurement:
    wall: float
    cpu: float
    max_rss_kib: int
    exit_code: int
    timed_out: bool


# Why a launcher: Linux carries a process's peak RSS across exec, and a child of this harness starts as a
# (v)fork of it, so its ru_maxrss would never read below the harness's own peak (tens of MiB), which hides
# what curl and aria2c really use. This small interpreter forks the tool itself, so the floor is its own
# small resident set (reported as "RSS floor" in the results), then waits with wait4 and writes what it saw.
LAUNCHER = """
import os, signal, sys, time
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
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
signal.setitimer(signal.ITIMER_REAL, 0)
with open(result, "w") as handle:
    cpu = usage.ru_utime + usage.ru_stime
    handle.write(f"{wall} {cpu} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)} {timed_out}\\n")
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
    wall, cpu, max_rss, exit_code, timed_out = result.read_text().split()
    return Measurement(float(wall), float(cpu), int(max_rss), int(exit_code), timed_out == "1")


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
        return max(run.measurement.max_rss_kib for run in runs) / KIB if runs else None

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
        for round_index in range(1, self.runs + 1):
            for tool in tools:
                result.runs.append(self.one_run(name, model, tool, round_index, limited=limited))
        return result

    def one_run(self, name: str, model: Model, tool: Tool, round_index: int, *, limited: bool) -> Run:
        out = self.fresh_dir(f"{name}-{tool.key}")
        argv = tool.command(model, out, self.scratch, self.nginx.port)
        output = self.scratch / f"{out.name}.log"
        # Start each run with no write-back pending from the previous one (deleted files have none left).
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
        # The page cache cannot be dropped reliably here; deleting the output right away at least keeps one
        # run's dirty pages and cached output from helping or hurting the next.
        shutil.rmtree(out, ignore_errors=True)
        m = measurement
        status = "ok" if error is None else f"FAILED ({error})"
        log(
            f"  [{name}] round {round_index} {tool.key:14} {m.wall:7.2f} s wall {m.cpu:7.2f} s CPU "
            f"{m.max_rss_kib / KIB:7.1f} MiB  {status}"
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
            log(f"  [rerun] run {index} {m.wall:6.3f} s wall {m.cpu:6.3f} s CPU {m.max_rss_kib / KIB:6.1f} MiB")
            results.append(m)
        time.sleep(0.5)
        blob_requests = sum(1 for line in self.nginx.read_log(offset) if "/blobs/" in line.uri)
        verify_store(out, model, self.nginx.port)
        shutil.rmtree(out, ignore_errors=True)
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
            shutil.rmtree(out, ignore_errors=True)
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


# ---------------------------------------------------------------------------------------------------- report


@dataclass
class Target:
    workload: str
    text: str
    measured: str
    met: bool | None  # None: not evaluated (no successful runs to compare)
    miss: str = ""


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def verdict(target: Target) -> str:
    if target.met is None:
        return "not evaluated"
    return "yes" if target.met else f"**no** ({target.miss})" if target.miss else "**no**"


def at_most(
    workload: str, text: str, value: float | None, limit: float, unit: str, failures: int = 0, digits: int = 2
) -> Target:
    if value is None:
        return Target(workload, text, "n/a", None)
    measured = f"{value:.{digits}f}{unit}"
    if failures:
        return Target(workload, text, measured, False, f"{failures} failed ollama-pull run(s)")
    miss = "" if value <= limit else f"{value / limit - 1:.0%} over the limit"
    return Target(workload, text, measured, value <= limit, miss)


def workload_table(result: WorkloadResult) -> str:
    ollama = result.tools[0]
    mib = result.model.total_bytes / MIB
    lines = [
        f"### {result.name}: {result.model.describe()}",
        "",
        "| tool | ok runs | median wall s | walls s | median CPU s | CPU s/GiB | peak RSS MiB | MiB/s "
        "| ollama-pull / tool |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tool in result.tools:
        runs = result.of(tool, ok_only=False)
        walls = ", ".join(f"{run.measurement.wall:.2f}" + ("" if run.ok else " (failed)") for run in runs)
        wall = result.median_wall(tool)
        rate = fmt(mib / wall, 0) if wall else "n/a"
        ratio = "1.00" if tool is ollama else fmt(result.paired_ratio(ollama, tool))
        ok = f"{len(result.of(tool))}/{len(runs)}"
        rss = fmt(result.peak_rss_mib(tool), 1)
        median_cpu = result.median_cpu(tool)
        cpu = fmt(median_cpu)
        per_gib = fmt(None if median_cpu is None else median_cpu / (mib / KIB))
        row = f"| {tool.label} | {ok} | {fmt(wall)} | {walls} | {cpu} | {per_gib} | {rss} | {rate} | {ratio} |"
        lines.append(row)
    return "\n".join(lines)


def blob_cost(results: list[WorkloadResult], tool: Tool) -> float | None:
    """The slope between the fewest and the most blobs, at equal bytes: what one more blob costs, in ms."""
    first, last = results[0].median_wall(tool), results[-1].median_wall(tool)
    if first is None or last is None:
        return None
    return (last - first) / (len(results[-1].model.blobs) - len(results[0].model.blobs)) * 1000


def scaling_table(results: list[WorkloadResult]) -> str:
    counts = [len(r.model.blobs) - 1 for r in results]  # layers, without the config blob
    header = " | ".join(f"{count} blobs: wall s" for count in counts)
    lines = [
        f"### scaling: {results[0].model.total_bytes / MIB:.0f} MiB in {', '.join(map(str, counts))} blobs",
        "",
        f"| tool | {header} | cost per extra blob ms | ollama-pull / tool at {counts[-1]} blobs |",
        "| --- |" + " --- |" * (len(counts) + 2),
    ]
    ollama = results[0].tools[0]
    for tool in results[0].tools:
        walls = [r.median_wall(tool) for r in results]
        per_blob = blob_cost(results, tool)
        ratio = "1.00" if tool is ollama else fmt(results[-1].paired_ratio(ollama, tool))
        cells = " | ".join(fmt(w) for w in walls)
        lines.append(f"| {tool.label} | {cells} | {fmt(per_blob, 3)} | {ratio} |")
    return "\n".join(lines)


def machine_facts() -> list[tuple[str, str]]:
    cpu = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / MIB:.1f} GiB"
                break
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=False)
    commit_text = commit.stdout.strip() or "?"
    if dirty.stdout.strip():
        # Others edit the tree while this runs: say so rather than pretend the commit is what was measured.
        commit_text += " (the working tree had uncommitted changes)"
    return [
        ("CPUs", f"{os.cpu_count()} (nproc {len(os.sched_getaffinity(0))}), {cpu}"),
        ("Memory", memory),
        ("Kernel", f"{platform.system()} {platform.release()}"),
        ("Commit", commit_text),
    ]


def render(
    command: str,
    profile: Profile,
    runs: int,
    programs: dict[str, str],
    workloads: list[WorkloadResult],
    scaling: list[WorkloadResult],
    rerun: tuple[list[Measurement], int] | None,
    startup: tuple[list[Measurement], list[Measurement]] | None,
    resume: list[ResumeResult] | None,
    rss_floor: Measurement,
    elapsed: float,
) -> tuple[str, list[Target]]:
    targets: list[Target] = []
    by_name = {w.name: w for w in workloads}
    if (w := by_name.get("tensors")) is not None:
        ratio = w.paired_ratio(OLLAMA, GO)
        targets.append(at_most("tensors", "wall <= 2.5 x x/transfer (Go)", ratio, 2.5, " x", w.failures(OLLAMA)))
    if scaling:
        per_blob = blob_cost(scaling, OLLAMA)
        text = "cost per extra blob <= 0.8 ms"
        targets.append(at_most("scaling", text, per_blob, 0.8, " ms", digits=3))
    if (w := by_name.get("many")) is not None:
        failures = w.failures(OLLAMA)
        ratio = w.paired_ratio(OLLAMA, GO)
        targets.append(at_most("many", "wall <= 1.5 x x/transfer (Go)", ratio, 1.5, " x", failures))
        ratio = w.paired_ratio(OLLAMA, ARIA2)
        targets.append(at_most("many", "wall <= 0.5 x aria2c", ratio, 0.5, " x", failures))
        ratio = w.paired_ratio(OLLAMA, CURL_PARALLEL)
        targets.append(at_most("many", "wall <= 2.5 x curl --parallel", ratio, 2.5, " x", failures))
    if (w := by_name.get("many-limited")) is not None:
        ratio = w.paired_ratio(OLLAMA, GO_WIDE)
        text = f"wall <= 1.0 x x/transfer (Go) with {GO_MANY_STREAMS} bodies"
        targets.append(at_most("many-limited", text, ratio, 1.0, " x", w.failures(OLLAMA)))
    if (w := by_name.get("big")) is not None:
        ratio = w.paired_ratio(OLLAMA, CURL_SINGLE)
        targets.append(at_most("big", "wall <= 1.5 x curl single stream", ratio, 1.5, " x", w.failures(OLLAMA)))
    if (w := by_name.get("big-limited")) is not None:
        ratio = w.paired_ratio(OLLAMA, CURL_SINGLE)
        speedup = None if ratio is None else 1 / ratio
        text = ">= 8 x faster than one stream"
        if speedup is None:
            targets.append(Target("big-limited", text, "n/a", None))
        else:
            met = speedup >= 8 and not w.failures(OLLAMA)
            miss = "" if met else f"{8 / speedup:.1f} x short of 8 x"
            targets.append(Target("big-limited", text, f"{speedup:.2f} x faster", met, miss))
        ratio = w.paired_ratio(OLLAMA, ARIA2)
        targets.append(at_most("big-limited", "wall <= 1.3 x aria2c -x 16", ratio, 1.3, " x", w.failures(OLLAMA)))
    for w in [*workloads, *scaling]:
        peak = w.peak_rss_mib(OLLAMA)
        targets.append(at_most(w.name, "peak RSS <= 100 MiB", peak, MEMORY_TARGET_MIB, " MiB", digits=1))
    if rerun:
        median = statistics.median(m.wall for m in rerun[0])
        text = "re-run of many, all present: wall < 0.5 s"
        target = at_most("rerun", text, median, 0.5, " s", digits=3)
        if rerun[1]:
            target = Target("rerun", text, target.measured, False, f"it requested {rerun[1]} blob(s) again")
        targets.append(target)
    if startup:
        median = statistics.median(m.wall for m in startup[0])
        targets.append(at_most("version", "ollama-pull --version: wall < 0.3 s", median, 0.3, " s", digits=3))
    if resume:
        worst = max(r.fraction for r in resume)
        text = "after SIGKILL at ~50%, re-downloads <= 5% of the bytes it had"
        targets.append(at_most("resume", text, worst * 100, 5.0, " % (worst run)"))

    out: list[str] = ["# ollama-pull benchmark results", ""]
    out.append(f"Command: `{command}`  ")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out.append(f"Date: {now}, {elapsed / 60:.1f} minutes  ")
    for key, value in machine_facts():
        out.append(f"{key}: {value}  ")
    versions = [program_version([str(OLLAMA_PULL), "--version"])]
    if "nginx" in programs:
        versions.append(program_version([programs["nginx"], "-v"]))
    if "aria2c" in programs:
        versions.append(program_version([programs["aria2c"], "--version"]))
    if "curl" in programs:
        versions.append(" ".join(program_version([programs["curl"], "--version"]).split()[:2]))
    versions.append(f"Python {platform.python_version()}")
    if "go" in programs:
        versions.append(f"x/transfer (Go): `{os.environ.get(GO_PEER_VARIABLE, '')}`")
    else:
        versions.append(f"x/transfer (Go): skipped, {GO_PEER_VARIABLE} unset")
    out.append(f"Tools: {'; '.join(versions)}  ")
    out.append(
        f"Profile: {profile.name}, {runs} round(s) per transfer workload, tools alternating within each round; "
        "medians. Ratios are ollama-pull's wall time over the peer's, the median over rounds of same-round pairs."
    )
    out += ["", "## Targets", "", "| workload | target | measured | met |", "| --- | --- | --- | --- |"]
    out += [f"| {t.workload} | {t.text} | {t.measured} | {verdict(t)} |" for t in targets]
    out += ["", "## Transfers", ""]
    for w in workloads:
        out += [workload_table(w), ""]
    if scaling:
        out += [scaling_table(scaling), ""]
        out += [workload_table(w) + "\n" for w in scaling]
    if rerun or startup or resume:
        out += ["## Start-up and resume", ""]
    if rerun:
        reruns, blob_requests = rerun
        walls = ", ".join(f"{m.wall:.3f}" for m in reruns)
        out.append(
            f"- Re-run of `many` with every blob present: median {statistics.median(m.wall for m in reruns):.3f} s "
            f"wall, {statistics.median(m.cpu for m in reruns):.3f} s CPU, peak RSS "
            f"{max(m.max_rss_kib for m in reruns) / KIB:.1f} MiB (runs: {walls}); blob requests nginx saw during "
            f"the re-runs: {blob_requests}."
        )
    if startup:
        version, bare = startup
        out.append(
            f"- `ollama-pull --version`: median {statistics.median(m.wall for m in version):.3f} s wall, "
            f"{statistics.median(m.cpu for m in version):.3f} s CPU; a bare `python -c pass` from the same venv: "
            f"{statistics.median(m.wall for m in bare):.3f} s."
        )
    for index, r in enumerate(resume or [], 1):
        out.append(
            f"- Resume run {index}: killed with {r.had / MIB:.1f} of {r.size / MIB:.0f} MiB in the partial file; "
            f"the re-run asked for {', '.join(r.ranges) or 'no Range'} and nginx sent {r.sent / MIB:.1f} MiB, "
            f"{r.redownloaded / MIB:.2f} MiB ({r.fraction:.2%}) of it bytes it already had; "
            f"re-run {r.second.wall:.2f} s wall."
        )
    out += ["", "## Notes", ""]
    out += [
        "- Every ollama-pull run's store is checked byte for byte after the run (each blob's SHA-256 equals its "
        "name, the manifest file equals the served bytes); a mismatch stops the benchmark. A run that exits "
        "non-zero, times out or leaves a file of the wrong size is listed as failed and left out of medians; "
        "a failed ollama-pull run fails its targets.",
        "- aria2c verifies each file's SHA-256 itself (`checksum=`); curl verifies nothing and is the floor of "
        "what loopback and the disk allow. ollama-pull also fsyncs every blob before naming it; the peers do not.",
        "- The page cache cannot be dropped reliably on a shared machine: nginx serves the tree from cache (it "
        "was just written), each run's output directory is deleted right after it is measured, and `sync` runs "
        "before each run so that no write-back from one run lands in the next.",
        f"- big-limited, many-limited: nginx `limit_rate {LIMIT_RATE}` per connection ({LIMIT_RATE_BYTES // MIB} "
        "MiB/s).",
        "- x/transfer (Go) is Ollama's downloader for tensor models, driven by a small main that fetches the "
        "manifest, calls `transfer.Download` and writes the manifest; its store is checked byte for byte like "
        "ollama-pull's. It hashes every blob but fsyncs nothing, and against a registry that answers a blob GET with "
        "200 rather than a redirect it downloads every body twice (its `resolve` GETs and drains the body first). "
        f"`N bodies` is OLLAMA_MAX_TRANSFER_STREAMS (Ollama's default {GO_DEFAULT_STREAMS}).",
        "- Where ollama-pull's time goes, and why the targets it misses are missed: bench/PROFILE.md.",
        "- Peak RSS is the child's `ru_maxrss` from `wait4`, the largest over the runs; CPU is user + system. "
        "Each tool is forked by a small launcher (Linux keeps a peak RSS across exec, so a tool forked by the "
        "harness would inherit the harness's): no figure can read below that launcher's, "
        f"{rss_floor.max_rss_kib / KIB:.1f} MiB here (measured with `true`).",
    ]
    return "\n".join(out) + "\n", targets


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one round: a smoke run of ~1 minute")
    parser.add_argument("--runs", type=int, help="rounds per transfer workload (default 3, --quick 1)")
    parser.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help=f"comma-separated subset of {','.join(ALL_WORKLOADS)} (default: all)",
    )
    parser.add_argument("--out", type=Path, help="results file (default bench/RESULTS.md, --quick RESULTS-quick.md)")
    parser.add_argument("--tmp", type=Path, help="where to make the scratch directory (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (tree, logs) afterwards")
    args = parser.parse_args(argv)
    chosen = {name.strip() for name in args.workloads.split(",") if name.strip()}
    unknown = chosen - set(ALL_WORKLOADS)
    if unknown or not chosen:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {','.join(ALL_WORKLOADS)}")
    args.workloads = chosen
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    profile = QUICK if args.quick else FULL
    runs: int = args.runs or profile.runs
    chosen: set[str] = args.workloads
    out_file: Path = args.out or BENCH_DIR / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    # The interpreter as the caller named it: its bare name when that is what PATH finds, else its path.
    interpreter = sys.executable
    if shutil.which(Path(interpreter).name) == interpreter:
        interpreter = Path(interpreter).name
    elif Path(interpreter).is_relative_to(REPO):
        interpreter = str(Path(interpreter).relative_to(REPO))
    command = shlex.join([interpreter, *sys.argv])
    started = time.perf_counter()

    programs = ensure_programs()
    go_peer = os.environ.get(GO_PEER_VARIABLE, "").strip()
    if go_peer:
        programs["go"] = shlex.split(go_peer)[0]
    else:
        log(f"{GO_PEER_VARIABLE} is not set: skipping Ollama's Go downloader (x/transfer); see bench/README.md")
    scratch = Path(tempfile.mkdtemp(prefix="ollama-pull-bench-", dir=args.tmp))
    os.chmod(scratch, 0o755)  # nginx's workers (not root) must reach the tree inside
    tree = Tree(scratch / "registry")
    nginx = Nginx(programs["nginx"], scratch / "nginx", tree.root)
    try:
        build_tree(tree, profile, chosen)
        nginx.start()
        nginx.self_check(next(iter(tree.models.values())))
        log(f"nginx on http://{HOST}:{nginx.port}/, scratch {scratch}")
        bench = Bench(nginx, scratch, profile, runs)
        rss_floor = measure(["true"], scratch / "floor.log", 30)
        log(f"RSS floor of the launcher: {rss_floor.max_rss_kib / KIB:.1f} MiB")
        models = tree.models
        go = [GO] if go_peer else []
        workloads: list[WorkloadResult] = []
        if "tensors" in chosen:
            tools = [OLLAMA, *go, CURL_PARALLEL]
            workloads.append(bench.workload("tensors", models["tensors"], tools))
        if "many" in chosen:
            workloads.append(bench.workload("many", models["many"], [OLLAMA, *go, ARIA2, CURL_PARALLEL]))
        if "many-limited" in chosen:
            tools = [OLLAMA, *go, *([GO_WIDE] if go_peer else []), ARIA2]
            workloads.append(bench.workload("many-limited", models["many-limited"], tools, limited=True))
        if "big" in chosen:
            workloads.append(bench.workload("big", models["big"], [OLLAMA, *go, ARIA2, CURL_SINGLE]))
        if "big-limited" in chosen:
            # No Go peer here: one blob is one body for it, fetched twice at 20 MiB/s (about 100 s a run), and no
            # target compares against it.
            tools = [OLLAMA, ARIA2, CURL_SINGLE]
            workloads.append(bench.workload("big-limited", models["big-limited"], tools, limited=True))
        scaling: list[WorkloadResult] = []
        if "scaling" in chosen:
            for count in profile.scaling_counts:
                name = f"scaling-{count}"
                scaling.append(bench.workload(name, models[name], [OLLAMA, *go, ARIA2, CURL_PARALLEL]))
        rerun = bench.rerun(models["many"], profile.short_runs) if "rerun" in chosen else None
        startup = bench.startup(profile.short_runs) if "version" in chosen else None
        resume = bench.resume(models["big"], profile.resume_runs) if "resume" in chosen else None
    except StoreMismatch as exc:
        log(f"\nFAILED: ollama-pull's store is not what the registry serves: {exc}")
        return 1
    finally:
        nginx.stop()
        if args.keep:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    report, targets = render(
        command,
        profile,
        runs,
        programs,
        workloads,
        scaling,
        rerun,
        startup,
        resume,
        rss_floor,
        time.perf_counter() - started,
    )
    print(report)
    out_file.write_text(report)
    log(f"wrote {out_file}")
    failed_runs = sum(1 for w in [*workloads, *scaling] for run in w.runs if not run.ok)
    if failed_runs:
        log(f"{failed_runs} run(s) failed; see the tables")
        return 1
    missed = [t for t in targets if t.met is False]
    log(f"{len(targets) - len(missed)} of {len(targets)} targets met")
    return 0


if __name__ == "__main__":
    # A plain kill must still stop nginx and remove the scratch tree: turn SIGTERM into an orderly exit.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as exc:
        log(f"error: {exc}")
        sys.exit(2)
