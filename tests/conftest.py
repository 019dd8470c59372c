"""Shared pytest fixtures: the session-scoped Go builds and package downloads."""

from tests.goinfo_fixtures import (  # noqa: F401  (fixtures are found by name)
    c_bins_fixture,
    debian_bins_fixture,
    esbuild_bins_fixture,
    go_bins_fixture,
    modern_go_bins_fixture,
)
