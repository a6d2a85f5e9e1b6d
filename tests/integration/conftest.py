"""Fixtures of the integration tests (beside tests/conftest.py's etcd)."""

from __future__ import annotations

import shutil

import pytest
from cli_world import Cli


@pytest.fixture
def cli(etcd, capsys):
    if not shutil.which("etcdctl"):
        pytest.skip("etcdctl not installed")
    c = Cli(etcd, capsys)
    c.register("n1", "n2", "n3", hidden=("n3",))
    return c
