"""The README documents every setting, and the quick start commands exist."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cellstream.config import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (REPO / "README.md").read_text()
    for field in dataclasses.fields(Settings):
        flag, env = "--" + field.name.replace("_", "-"), ENV_PREFIX + field.name.upper()
        assert f"| `{flag}` | `{env}` |" in readme, f"README's settings table lacks {flag} / {env}"


def test_quick_start_targets_exist() -> None:
    makefile = (REPO / "Makefile").read_text()
    for target in ("run:", "test:", "proto:", "bench:", "e2e:", "image:", "image-test:"):
        assert f"\n{target}" in makefile, target
    assert "make test" in (REPO / ".ci" / "run").read_text()
