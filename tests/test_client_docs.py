"""docs/client.md: every Python example in it runs as written against a real server, as `make run`
serves (the bundled models, the CO2 demo the default), and the guide covers the client's API."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator

import pytest

from cellstream.client import AsyncClient, AsyncClusterClient, Client, ClusterClient, Stepper
from support import REPO, RunningServer, start_server

GUIDE = REPO / "docs" / "client.md"
ADDRESS = "localhost:50051"  # what the examples say; the test's server is on port 0
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def examples() -> list[tuple[int, str]]:
    """Each ```python block of the guide with the line it starts on."""
    text = GUIDE.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in BLOCK.finditer(text)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("client-docs"), "--default-model", "demo")
    yield running
    assert running.stop() == 0, running.log()


@pytest.mark.parametrize(("line", "source"), examples(), ids=[f"line-{line}" for line, _ in examples()])
def test_the_example_runs_against_a_real_server(served: RunningServer, line: int, source: str) -> None:
    assert ADDRESS in source, "an example that talks to no server shows nothing of the client"
    # Padded so that a failure's traceback names the guide's own line.
    code = "\n" * (line - 1) + source.replace(ADDRESS, served.address)
    exec(compile(code, str(GUIDE), "exec"), {"__name__": "client_guide_example"})


def test_the_guide_has_an_example_for_each_part_of_the_client() -> None:
    code = "\n".join(source for _, source in examples())
    for used in (
        "Client(",
        "AsyncClient(",
        "Stepper(",
        "ClusterClient(",
        "AsyncClusterClient(",
        "resume=True",
        "seq=",
        "timeout=",
        ".step_stream(",
        ".step_batch(",
        "except NotFound",
        "except CellStreamError",
        "except grpc.RpcError",
        ".step",
    ):
        assert used in code, f"no example uses {used}"


def test_the_guide_names_every_public_method() -> None:
    text = GUIDE.read_text()
    for cls in (Client, AsyncClient, Stepper, ClusterClient, AsyncClusterClient):
        for name, _ in inspect.getmembers(cls, inspect.isfunction):
            if not name.startswith("_"):
                assert f"{name}(" in text, f"docs/client.md does not mention {cls.__name__}.{name}()"


def test_the_readme_links_the_guide_at_the_end_of_its_api_section() -> None:
    readme = (REPO / "README.md").read_text()
    api = readme.split("\n## The API\n", 1)[1].split("\n## ", 1)[0]
    assert api.rstrip().endswith("The Python client: [docs/client.md](docs/client.md).")
