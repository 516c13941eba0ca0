"""Shared fixtures: a forge on a fresh state directory with two cheap blueprints compiled."""
import os
import shutil
import tempfile

import pytest

import tezzeret

# Cheap blueprints of the default catalog: BP001 identity, BP016 a small conv block.
COMPILED = ("BP001", "BP016")


@pytest.fixture
def state_dir():
    path = tempfile.mkdtemp(prefix="tezzeret-py-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def compiled_state():
    """A state directory where COMPILED are compiled (Fast, CPU); reopened per test."""
    path = tempfile.mkdtemp(prefix="tezzeret-py-compiled-")
    with tezzeret.Forge(path, strategy="fast", device="cpu", telemetry_interval=0) as forge:
        for blueprint in COMPILED:
            forge.compile_now(blueprint)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def forge(compiled_state):
    with tezzeret.Forge(compiled_state, strategy="fast", device="cpu", telemetry_interval=0) as f:
        yield f


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
