"""pytest plugin used by tools/mutate.py: leaves out the tests that use a fixture named in $MUTATE_SKIP_FIXTURES
(fixtures that drive the code through child processes, which mutmut's test map cannot see into)."""
from __future__ import annotations

import os


def pytest_collection_modifyitems(config, items) -> None:
    skipped = set(os.environ.get("MUTATE_SKIP_FIXTURES", "").split())
    left_out = [item for item in items if skipped & set(getattr(item, "fixturenames", ()))]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]
