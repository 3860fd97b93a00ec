"""System programs some tests need (redis-server, chromium): found, or a clear skip naming the
program, what it is for and how to install it. With CONVEYOR_REQUIRE_SYSTEM=1 (set by .ci/run) or
CI set, a missing program fails the test instead, so CI can never go green by skipping them."""
from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ENV = "CONVEYOR_REQUIRE_SYSTEM"


def system_required() -> bool:
    """True where a missing system program must fail a test rather than skip it."""
    return os.environ.get(REQUIRE_ENV) == "1" or bool(os.environ.get("CI"))


def require_binary(names: str | tuple[str, ...], purpose: str, debian_package: str) -> str:
    """The path of the first of `names` on PATH; otherwise skips (or fails, see module doc) with
    a message saying what it is for and `apt-get install -y <debian_package>`."""
    names = (names,) if isinstance(names, str) else names
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = (f"{names[0]} is not installed ({purpose}): run ./install.sh test as root, or "
               f"apt-get install -y {debian_package}")
    if system_required():
        pytest.fail(f"{message} [{REQUIRE_ENV}=1 or CI set: missing system programs fail]")
    pytest.skip(message)
