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
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# Run as a script (python bench/run.py), so its own directory is on sys.path and its modules import by name.
from common import KIB, BenchError, StoreMismatch, log
from dataset import FULL, QUICK, Tree, build_tree
from host import BENCH_DIR, HOST, REPO, compile_bytecode, ensure_programs
from measure import Bench, WorkloadResult, measure
from peers import ARIA2, CURL_PARALLEL, CURL_SINGLE, GO, GO_PEER_VARIABLE, GO_WIDE, OLLAMA
from report import render
from servers import Nginx

ALL_WORKLOADS = ("tensors", "many", "many-limited", "big", "big-limited", "scaling", "rerun", "version", "resume")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one round: a smoke run of ~1 minute")
    parser.add_argument("--runs", type=int, help="rounds per transfer workload (default 5, --quick 1)")
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
    compile_bytecode()
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
