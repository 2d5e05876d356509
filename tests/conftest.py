"""The fixtures the tests share; their helpers are in helpers.py."""

import pytest
from helpers import World, build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))
