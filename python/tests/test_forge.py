"""The forge from Python: open/close, work, catalog, prefetch, health,
metrics, keys, errors."""
import gc
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import tezzeret
from tezzeret import BlueprintDescriptor, ParameterBounds


def test_version_and_abi():
    assert tezzeret.__version__ == "0.1.0"


def test_compile_now_announces_and_catalog_lists_it(state_dir):
    updates = []
    with tezzeret.Forge(state_dir, strategy="fast", device="cpu", telemetry_interval=0, on_catalog_update=updates.append) as forge:
        forge.compile_now("BP001")
        assert [u.blueprint_id for u in updates] == ["BP001"]
        catalog = {a["blueprint_id"]: a for a in forge.catalog()}
        assert catalog["BP001"]["checksum"] == updates[0].checksum
        assert os.path.exists(updates[0].artifact_ref)


def test_submit_priority_drain_and_refresh_with_host_descriptors(state_dir):
    descriptors = [
        BlueprintDescriptor("BP001", "identity_passthrough"),
        BlueprintDescriptor("BP005", "relu_activation"),
    ]
    with tezzeret.Forge(state_dir, strategy="emergency", device="cpu", telemetry_interval=0, descriptors=lambda: descriptors) as forge:
        # Open queued both; a second submit changes the priority and keeps the job.
        first = forge.submit("BP005", priority="critical")
        again = forge.submit("BP005", priority="low")
        assert first == again
        completed, failed = forge.drain()
        assert (completed, failed) == (2, 0)
        descriptors.append(BlueprintDescriptor("BP002", "linear_projection", allowed_parameters={"scale": ParameterBounds(0.5, 2.0)}))
        assert forge.refresh() == (1, 0)
        assert forge.run().ok == 1
        with pytest.raises(tezzeret.InvalidArgumentError, match="priority"):
            forge.submit("BP001", priority="urgent")


def test_run_summary_counts_the_default_catalog_quarantine_refused(forge):
    summary = forge.run()
    assert summary.total >= 2 and summary.failed == 0


def test_prefetch_answers_ready_and_missing(forge):
    ready = forge.prefetch("BP016", request_id="r1")
    assert isinstance(ready, tezzeret.KernelArtifactReady)
    assert ready.request_id == "r1" and len(ready.checksum) == 64 and ready.prewarm_p50_ms > 0
    missing = forge.prefetch("BP999")
    assert isinstance(missing, tezzeret.KernelArtifactError) and missing.reason == "missing_artifact"


def test_health_and_metrics_are_decoded(forge):
    health = forge.health()
    assert health.status == "HEALTHY" and "queue_depth" in health.indicators
    names = {m.name for m in forge.metrics()}
    assert {"tezzeret.jobs.total", "tezzeret.cache.hits", "tezzeret.queue.depth"} <= names
    assert "tezzeret_jobs_total" in forge.prometheus()
    forge.report_resources(gpu_utilisation_percent=5.0, rss_bytes=1 << 20)
    with pytest.raises(tezzeret.InvalidArgumentError):
        forge.report_resources(gpu_utilisation_percent=500.0)


def test_signed_artifacts_verify_with_trusted_keys_and_refuse_others(state_dir):
    secret, public = tezzeret.keygen()
    assert len(secret) == len(public) == 32 and tezzeret.keygen()[0] != secret
    with tezzeret.Forge(state_dir, strategy="fast", device="cpu", telemetry_interval=0, signing_key=secret, trusted_keys=[public]) as forge:
        forge.compile_now("BP001")
        assert isinstance(forge.prefetch("BP001"), tezzeret.KernelArtifactReady)
    _, stranger = tezzeret.keygen()
    with tezzeret.Forge(state_dir, strategy="fast", device="cpu", telemetry_interval=0, trusted_keys=[stranger]) as forge:
        # Signed by a key it does not trust: out of its catalog.
        assert forge.prefetch("BP001").reason == "missing_artifact"
    with pytest.raises(tezzeret.InvalidArgumentError, match="32 bytes"):
        tezzeret.Forge(state_dir, signing_key=b"short")


def test_errors_are_one_class_per_code_under_one_base(state_dir, forge):
    with pytest.raises(tezzeret.NotFoundError) as info:
        forge.compile_now("BP404")
    assert isinstance(info.value, tezzeret.TezzeretError) and info.value.code == 7 and "BP404" in info.value.message
    with pytest.raises(tezzeret.StateLockedError):
        tezzeret.Forge(forge.state_dir)
    with pytest.raises(tezzeret.InvalidArgumentError, match="strategy"):
        tezzeret.Forge(state_dir, strategy="fastest")
    with pytest.raises(tezzeret.QuarantinedError):
        forge.compile_now("BP049")
    with pytest.raises(tezzeret.MalformedError):
        tezzeret.validate_descriptor(b"\xff\xff\xff")
    with pytest.raises(tezzeret.InvalidArgumentError, match="tier"):
        BlueprintDescriptor("BPX", "x", tier="BOGUS").encode()
    bad = BlueprintDescriptor("BP001", "identity_passthrough", allowed_parameters={"p": ParameterBounds(2.0, 1.0)})
    with pytest.raises(tezzeret.InvalidArgumentError):
        tezzeret.validate_descriptor(bad)


def test_a_closed_forge_refuses_calls_and_closes_twice(state_dir):
    forge = tezzeret.Forge(state_dir, device="cpu", telemetry_interval=0)
    forge.close()
    forge.close()
    assert forge.closed
    with pytest.raises(tezzeret.InvalidArgumentError, match="closed"):
        forge.run()
    # The directory is free again.
    tezzeret.Forge(state_dir, device="cpu", telemetry_interval=0).close()


def test_garbage_collection_closes_the_forge(state_dir):
    forge = tezzeret.Forge(state_dir, device="cpu", telemetry_interval=0)
    del forge
    gc.collect()
    tezzeret.Forge(state_dir, device="cpu", telemetry_interval=0).close()


def test_callback_exceptions_are_logged_never_raised(state_dir, caplog):
    def boom(_update):
        raise RuntimeError("host bug")

    with tezzeret.Forge(state_dir, strategy="fast", device="cpu", telemetry_interval=0, on_catalog_update=boom) as forge:
        forge.compile_now("BP001")
        assert isinstance(forge.prefetch("BP001"), tezzeret.KernelArtifactReady)
    assert any("catalog_update callback raised" in r.getMessage() for r in caplog.records)


def test_close_from_inside_a_callback_is_refused_and_the_forge_closes_after(state_dir):
    refused = []

    def close_now(_update):
        try:
            forge.close()
        except tezzeret.InvalidArgumentError as error:
            refused.append(str(error))

    forge = tezzeret.Forge(state_dir, strategy="fast", device="cpu", telemetry_interval=0, on_catalog_update=close_now)
    forge.compile_now("BP001")
    assert len(refused) == 1 and "inside one of its callbacks" in refused[0]
    assert not forge.closed
    assert isinstance(forge.prefetch("BP001"), tezzeret.KernelArtifactReady)
    forge.close()
    tezzeret.Forge(state_dir, device="cpu", telemetry_interval=0).close()


def test_a_forge_collected_inside_its_own_callback_is_closed_once_it_returns(state_dir):
    # The last reference goes in a telemetry callback, on the forge's own
    # background thread: the forge cannot close there, and must not be
    # freed under it either.
    held = {}
    dropped = threading.Event()

    def drop(_packet):
        if held.pop("forge", None) is not None:
            dropped.set()

    held["forge"] = tezzeret.Forge(state_dir, device="cpu", telemetry_interval=0.1, on_telemetry=drop)
    assert dropped.wait(120)
    deadline = time.monotonic() + 120
    while True:
        try:
            tezzeret.Forge(state_dir, device="cpu", telemetry_interval=0).close()
            break
        except tezzeret.StateLockedError:
            assert time.monotonic() < deadline, "the collected forge was never closed"
            time.sleep(0.01)


def test_an_enumerate_callback_that_raises_fails_the_open_cleanly(state_dir):
    def broken():
        raise RuntimeError("no descriptors today")

    with pytest.raises(tezzeret.TezzeretError):
        tezzeret.Forge(state_dir, device="cpu", telemetry_interval=0, descriptors=broken)
    tezzeret.Forge(state_dir, device="cpu", telemetry_interval=0).close()


def test_background_telemetry_arrives_while_the_main_thread_holds_the_gil(state_dir):
    packets = []
    arrived = threading.Event()

    def on_telemetry(packet):
        packets.append((packet, threading.current_thread() is threading.main_thread()))
        arrived.set()

    with tezzeret.Forge(state_dir, device="cpu", telemetry_interval=0.05, on_telemetry=on_telemetry):
        # A busy Python loop on the main thread: the callback still runs, on the forge's thread.
        spins = 0
        while not arrived.is_set():
            spins += 1
        assert spins > 0
    packet, on_main = packets[0]
    assert packet.source_subsystem == "tezzeret" and not on_main
    count = len(packets)
    # No callback after close.
    threading.Event().wait(0.2)
    assert len(packets) == count


def test_close_at_interpreter_exit_and_after_fork(tmp_path):
    script = f"""
import os, sys, tezzeret
forge = tezzeret.Forge({str(tmp_path)!r}, device="cpu", telemetry_interval=0.01)
pid = os.fork()
if pid == 0:
    forge.close()          # the child leaves the parent's forge alone
    os._exit(0 if forge.closed else 3)
_, status = os.waitpid(pid, 0)
assert os.WEXITSTATUS(status) == 0
print(forge.health().status)
# exit without closing: the interpreter's shutdown closes it
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "HEALTHY"
    # The state directory is free again: the exit released it.
    tezzeret.Forge(str(tmp_path), device="cpu", telemetry_interval=0).close()


def test_a_forked_child_neither_keeps_a_killed_parents_directory_locked_nor_unlocks_it(tmp_path):
    script = f"""
import os, sys, time, tezzeret
forge = tezzeret.Forge({str(tmp_path)!r}, device="cpu", telemetry_interval=0)
pid = os.fork()
if pid == 0:
    time.sleep(300)        # outlives its parent
    os._exit(0)
print(pid, flush=True)
time.sleep(300)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        # While the parent lives, the directory is its own.
        with pytest.raises(tezzeret.StateLockedError):
            tezzeret.Forge(str(tmp_path), device="cpu", telemetry_interval=0)
        parent.kill()
        parent.wait()
        # Killed: its child lives on, yet the directory is free.
        tezzeret.Forge(str(tmp_path), device="cpu", telemetry_interval=0).close()
    finally:
        parent.kill()
        os.kill(child, 9)


def test_torch_works_on_its_own_before_and_after():
    before = torch.randn(4, 4) @ torch.eye(4)
    script = "import torch; a = torch.ones(3) * 2; import tezzeret; b = torch.ones(3) * 2; assert torch.equal(a, b); print(torch.__version__)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("2.11")
    assert torch.allclose(before, before @ torch.eye(4))
