"""Token services that stall, fail, refuse or hand out tokens that expire after a few uses, against the real CLI.

The figures the tests measure (token requests per pull, time to the error) are printed past pytest's capture.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from tests.fault_registry import Fault, FaultRegistry

from .conftest import assert_store_holds, reference, run_cli
from .test_hostile_servers import assert_one_line_error, report

pytestmark = pytest.mark.integration

FAST = ("--insecure", "--stall-timeout", "0.5")
ALWAYS = 100


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault("stall_before", seconds=30), id="stalls"),
        pytest.param(Fault("status", status=503), id="http-503"),
        pytest.param(Fault("reset", at=0.5), id="reset"),
    ],
)
def test_a_token_service_that_fails_once_is_retried(models: Path, fault: Fault) -> None:
    with FaultRegistry(require_auth=True) as registry:
        model = registry.add_synthetic_model("library/demo", blobs=4, blob_size=16 * 1024)
        registry.inject("token", fault)
        started = time.monotonic()
        run = run_cli(models, *FAST, "-q", reference(registry, model), timeout=30)
        elapsed = time.monotonic() - started
        assert run.returncode == 0, run.stderr
        assert run.stderr == ""
        assert_store_holds(models, registry, model)
        # The failed token request, then the one that worked: the retry waited for no socket timeout.
        assert [r.fault for r in registry.token_requests] == [fault.kind, None]
        assert elapsed < 10


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        pytest.param(
            Fault("stall_before", seconds=30, times=ALWAYS),
            "no data for 0.5s from the token service at 127.0.0.1",
            id="stalls",
        ),
        pytest.param(
            Fault("status", status=503, times=ALWAYS), "the token service at 127.0.0.1 answered HTTP 503", id="http-503"
        ),
    ],
)
def test_a_token_service_that_always_fails_is_a_clear_error_soon(
    request: pytest.FixtureRequest, models: Path, fault: Fault, message: str
) -> None:
    with FaultRegistry(require_auth=True) as registry:
        model = registry.add_synthetic_model("library/demo", blobs=2, blob_size=1024)
        registry.inject("token", fault)
        started = time.monotonic()
        run = run_cli(models, *FAST, "--retries", "3", "-q", reference(registry, model), timeout=60)
        elapsed = time.monotonic() - started
        line = assert_one_line_error(run, 1, message, "(tried 3 times)")
        assert len(registry.token_requests) == 3
    assert not models.exists() or not any(models.rglob("*"))
    assert elapsed < 15
    report(request.config, f"token service that always {request.node.callspec.id}: {elapsed:.1f}s to {line!r}")


def test_tokens_good_for_a_few_uses_under_64_downloads_at_once(request: pytest.FixtureRequest, models: Path) -> None:
    uses = 16
    with FaultRegistry(require_auth=True, token_uses=uses) as registry:
        model = registry.add_synthetic_model("library/demo", blobs=256, blob_size=4 * 1024)
        # The default stall timeout: on a loaded machine a short one could retry a blob, and count a use more.
        run = run_cli(models, "--insecure", "-q", "-j", "64", reference(registry, model), timeout=60)
        assert run.returncode == 0, run.stderr
        assert_store_holds(models, registry, model)
        granted = [r for r in registry.requests if r.status == 200 and "authorization" in r.headers]
        tokens = len(registry.token_requests)
    # The manifest and every blob took one use of a token; each token was used up before the next was asked for,
    # and the downloads that met the same expiry shared one refresh.
    assert len(granted) == len(model.blobs) + 1
    needed = math.ceil(len(granted) / uses)
    assert needed <= tokens <= needed * 1.5
    report(
        request.config,
        f"tokens good for {uses} uses, {len(model.blobs)} blobs, -j 64: {tokens} token requests ({needed} at least)",
    )


@pytest.mark.parametrize("status", [401, 403])
def test_a_refusing_token_service_is_exit_4_at_once(models: Path, status: int) -> None:
    with FaultRegistry(require_auth=True) as registry:
        model = registry.add_synthetic_model("library/demo", blobs=2, blob_size=1024)
        registry.inject("token", Fault("status", status=status, times=ALWAYS))
        started = time.monotonic()
        run = run_cli(models, *FAST, "-q", reference(registry, model))
        elapsed = time.monotonic() - started
        assert_one_line_error(run, 4, f"the token service at 127.0.0.1 refused access (HTTP {status})")
        # Final: asked once, no retry, no backoff.
        assert len(registry.token_requests) == 1
    assert elapsed < 5
