"""A helper process of a pull, spawned (``python -m ollama_pull.helper``: its job on stdin, its reports on stdout)
or forked (two pipes): downloads its share of the blobs into the store and reports to the parent (see
:mod:`ollama_pull.processes`)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from typing import BinaryIO

from .api import Puller
from .engine import Downloader
from .errors import OllamaPullError
from .processes import FrameWriter, HelperJob, read_frame

# Events go to the parent at most this often, a frame each: one per event would be a system call per progress step.
_SEND_EVERY = 0.05


async def _serve(job: HelperJob, out: FrameWriter, job_input: BinaryIO) -> None:
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    # SIGTERM from the parent that cancels; SIGINT from a terminal's Ctrl-C, which reaches the whole group. One
    # the helper was started with ignored stays so, as its parent's does (a shell's background job).
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) != signal.SIG_IGN:
            loop.add_signal_handler(signum, me.cancel)
    # The end of the job's pipe: the parent is gone, and nobody is left to report to.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), job_input)
    watch = asyncio.ensure_future(reader.read())

    def gone(_: object) -> None:
        me.cancel()

    watch.add_done_callback(gone)

    async def send_often() -> None:
        while True:
            await asyncio.sleep(_SEND_EVERY)
            out.send()

    sender = asyncio.ensure_future(send_often())
    try:
        async with Puller(
            models_dir=job.models_dir,
            insecure=job.insecure,
            settings=job.settings,
            mirror=job.mirror,
            ca_cert=job.ca_cert,
        ) as puller:
            downloader = Downloader(puller.registry, puller.store, settings=job.settings, on_event=out.event)
            stats = await downloader.download(job.reference, job.layers, model=job.model, shared=True)
        out.outcome(stats)
    except OllamaPullError as exc:
        out.outcome(exc)
    finally:
        sender.cancel()
        watch.remove_done_callback(gone)
        watch.cancel()


def serve(job_input: BinaryIO, output: BinaryIO) -> int:
    """Read the job, download it, report; the exit code (1: cancelled)."""
    job = read_frame(job_input)
    if not isinstance(job, HelperJob):
        # The parent went away, or needed no helper after all, before it sent a job: nothing to do.
        return 0
    # What stays alive for the whole download (modules, the job) is left out of every collection.
    gc.freeze()
    gc.set_threshold(*job.collector)
    out = FrameWriter(output.write, output.flush)
    loop_factory = None
    if job.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    code = 0
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(job, out, job_input))
    except asyncio.CancelledError:
        code = 1
    output.flush()
    return code


def main() -> None:
    code = serve(sys.stdin.buffer, sys.stdout.buffer)
    # Every file is closed and every frame sent: the interpreter's own shutdown (50-100 ms of finalizing modules)
    # would only keep the parent waiting for our end of the pipe.
    os._exit(code)


if __name__ == "__main__":
    main()
