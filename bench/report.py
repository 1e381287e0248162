"""The report: the issue's targets judged, one table per workload, and the Markdown of RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass

from common import KIB, MIB
from dataset import Profile
from host import OLLAMA_PULL, REPO, VENV_PYTHON, child_env, program_version
from measure import Measurement, ResumeResult, WorkloadResult
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
)
from servers import LIMIT_RATE, LIMIT_RATE_BYTES

MEMORY_TARGET_MIB = 100.0


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
        "| tool | ok runs | median wall s | walls s | median CPU s | CPU s/GiB | peak memory MiB | MiB/s "
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


def event_loop() -> str:
    """The event loop ollama-pull runs on here: uvloop's when the venv has it, unless OLLAMA_PULL_EVENT_LOOP says
    asyncio (the runs inherit the variable)."""
    probe = "import uvloop; print(uvloop.__version__)"
    found = subprocess.run(
        [str(VENV_PYTHON), "-c", probe], capture_output=True, text=True, check=False, env=child_env()
    )
    if found.returncode != 0 or os.environ.get("OLLAMA_PULL_EVENT_LOOP", "").strip().lower() == "asyncio":
        return "event loop: asyncio's"
    return f"event loop: uvloop {found.stdout.strip()}"


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
        targets.append(at_most(w.name, "peak memory <= 100 MiB", peak, MEMORY_TARGET_MIB, " MiB", digits=1))
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
    versions = [program_version([str(OLLAMA_PULL), "--version"]), event_loop()]
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
        f"Profile: {profile.name}, {runs} round(s) per transfer workload after one untimed run of ollama-pull, "
        "tools alternating within each round; medians. Ratios are ollama-pull's wall time over the peer's, the "
        "median over rounds of same-round pairs."
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
            f"{max(m.memory_kib for m in reruns) / KIB:.1f} MiB (runs: {walls}); blob requests nginx saw during "
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
        "what loopback and the disk allow. ollama-pull also makes every blob durable before naming it (an fsync, "
        "or one syncfs for the blobs that verify together); the peers do not.",
        "- The page cache cannot be dropped reliably on a shared machine, so every run finds the workload in it: "
        "the harness reads the files nginx serves right before each run (this machine's kernel pages out file "
        "pages unused for about a minute), each workload starts with an untimed run of ollama-pull (memory freed "
        "here goes back to the hypervisor within seconds, and its first touch costs about 1.7 s per GiB, so a "
        "round 1 that followed a smaller workload paid for it), each run's "
        "output is emptied right after it is measured (its files truncated, which "
        "frees their pages as deleting them would; the files go with the scratch directory at the end, since "
        "creating thousands of files just after as many were deleted took twice as long on ext4), and `sync` "
        "runs before each run so that no write-back from one run lands in the next.",
        f"- big-limited, many-limited: nginx `limit_rate {LIMIT_RATE}` per connection ({LIMIT_RATE_BYTES // MIB} "
        "MiB/s).",
        "- x/transfer (Go) is Ollama's downloader for tensor models, driven by a small main that fetches the "
        "manifest, calls `transfer.Download` and writes the manifest; its store is checked byte for byte like "
        "ollama-pull's. It hashes every blob but fsyncs nothing, and against a registry that answers a blob GET with "
        "200 rather than a redirect it downloads every body twice (its `resolve` GETs and drains the body first). "
        f"`N bodies` is OLLAMA_MAX_TRANSFER_STREAMS (Ollama's default {GO_DEFAULT_STREAMS}).",
        "- ollama-pull's package is byte-compiled before the first run, as pip does when it installs a wheel: the "
        "venv's install is editable, and its bytecode would otherwise be compiled again in every run wherever "
        "PYTHONDONTWRITEBYTECODE is set.",
        "- Where ollama-pull's time goes, and why the targets it misses are missed: bench/PROFILE.md.",
        "- Peak memory is the larger of the child's `ru_maxrss` from `wait4` (per process) and the resident "
        "memory of its process tree, sampled every 20 ms from smaps_rollup (private pages summed, shared pages "
        "once, which counts once the pages a forked helper still shares with its parent; ollama-pull may run a "
        "helper process beside itself), the largest over the runs; CPU is user + system, "
        "helpers included (the tool reaps them). "
        "Each tool is forked by a small launcher (Linux keeps a peak RSS across exec, so a tool forked by the "
        "harness would inherit the harness's): no figure can read below that launcher's, "
        f"{rss_floor.max_rss_kib / KIB:.1f} MiB here (measured with `true`).",
    ]
    return "\n".join(out) + "\n", targets
