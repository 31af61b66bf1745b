"""Suite-wide guards."""

from __future__ import annotations

import functools

import pytest

from metaopt import MetaOptimizer


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "path_fallback: the test expects an explicitly requested path to fall back (no compiler)"
    )


@pytest.fixture(autouse=True)
def _requested_paths_run(request, monkeypatch):
    """A test that asks for a path (``path="native"``, ``"fused"``, ``"generic"``) gets that path or
    fails: without this, a machine whose C compiler does not work would run the generic path
    under a test named native (construction only warns) and the test would prove nothing."""
    if request.node.get_closest_marker("path_fallback"):
        return
    init = MetaOptimizer.__init__

    @functools.wraps(init)
    def checked(self, *args, path="auto", **kwargs):
        init(self, *args, path=path, **kwargs)
        if path != "auto" and self.path != path:
            pytest.fail(f"asked for path={path!r}, the optimizer runs {self.path!r}", pytrace=False)

    monkeypatch.setattr(MetaOptimizer, "__init__", checked)
