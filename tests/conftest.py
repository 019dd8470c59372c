"""Shared pytest fixtures: the session-scoped Go builds, package downloads and install."""

import pytest

from tests.goinfo_fixtures import (  # noqa: F401  (fixtures are found by name)
    c_bins_fixture,
    debian_bins_fixture,
    esbuild_bins_fixture,
    go_bins_fixture,
    modern_go_bins_fixture,
    old_debian_bins_fixture,
)
from tests.install_fixtures import Installed, install


@pytest.fixture(scope="session", name="installed")
def installed_fixture(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """execguard installed by scripts/install.sh into a temporary root, once per session."""
    return install(tmp_path_factory.mktemp("installed"))
