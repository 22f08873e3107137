"""Secrets reach the pods as files: `contract.secret_value` reads NAME or the file NAME_FILE
names, and the local pod runner writes a Secret volume's keys where those names point."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.contract import secret_value
from kubetune.devcluster.podrunner import remap_paths

pytestmark = pytest.mark.unit


def test_the_variable_wins_over_the_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-file\n")
    env = {"TOK": "from-env", "TOK_FILE": str(token)}
    assert secret_value("TOK", env) == "from-env"
    assert secret_value("TOK", {"TOK_FILE": str(token)}) == "from-file"
    assert secret_value("TOK", {"TOK": "", "TOK_FILE": str(token)}) == "from-file"
    assert secret_value("TOK", {}) is None


def test_an_unreadable_secret_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TOK_FILE=.*missing.*Secret"):
        secret_value("TOK", {"TOK_FILE": str(tmp_path / "missing")})


def test_an_empty_secret_file_is_no_secret(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("\n")
    assert secret_value("TOK", {"TOK_FILE": str(tmp_path / "t")}) is None


def test_the_pod_runner_moves_paths_under_a_mount_only() -> None:
    env = {
        "A_FILE": "/var/run/secrets/kubetune/control/token",
        "B": "/var/run/secrets/kubetune/controller/x",
        "C": "/var/run/secrets/kubetune/control",
        "D": "plain",
    }
    out = remap_paths(env, "/var/run/secrets/kubetune/control", "/w/pod/secrets/control")
    assert out == {
        "A_FILE": "/w/pod/secrets/control/token",
        "B": "/var/run/secrets/kubetune/controller/x",
        "C": "/w/pod/secrets/control",
        "D": "plain",
    }
