from __future__ import annotations

import pytest

from minicloud.core.context import Context
from minicloud.state import SQLiteStore


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    yield s
    await s.close()


def ctx_of(project: str = "default", action: str = "network:test") -> Context:
    return Context.system("test", project=project, action=action)


@pytest.fixture
def ctx() -> Context:
    return ctx_of()
