"""The layering, checked on the source: only the protocol layer knows gRPC, imports point one way."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "service" / "cellstream"
WIRE = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "cellstream._proto")
# Server-side code below the protocols: each may import only the layers listed (and the leaves).
LEAVES = ("cellstream.config", "cellstream.errors", "cellstream.metrics", "cellstream.ids")
BELOW = {
    "model": ("cellstream.model_config", "cellstream.model_files"),
    "model_config": (),
    "model_files": (),
    "cluster": ("cellstream.cluster",),
    "streams": ("cellstream.model", "cellstream.streams"),
    "batching": ("cellstream.model", "cellstream.streams", "cellstream.batching"),
}


def modules() -> dict[str, list[str]]:
    """Each module of the package (path relative to it) and every module it imports."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "_proto":
            continue
        imports = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imports += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if node.module == "cellstream":  # from cellstream import metrics
                    imports += [f"cellstream.{alias.name}" for alias in node.names]
                else:
                    imports.append(node.module)
        found[relative.as_posix()] = imports
    return found


def layer_of(relative: str) -> str:
    return relative.split("/", maxsplit=1)[0].removesuffix(".py")


def test_only_protocols_server_client_and_tools_import_grpc_or_protobuf() -> None:
    allowed = {"protocols", "server", "client", "tools", "__main__"}
    leaks = {
        module: [name for name in imports if name.startswith(WIRE)]
        for module, imports in modules().items()
        if layer_of(module) not in allowed
    }
    assert not {m: names for m, names in leaks.items() if names}


def test_model_streams_and_batching_import_only_downwards() -> None:
    wrong = {}
    for module, imports in modules().items():
        layer = layer_of(module)
        if layer not in BELOW:
            continue
        allowed = (*BELOW[layer], *LEAVES)
        bad = [n for n in imports if n.startswith("cellstream") and not n.startswith(allowed)]
        if bad:
            wrong[module] = bad
    assert not wrong


def test_no_module_holds_more_than_about_400_lines() -> None:
    sizes = {m: len((PACKAGE / m).read_text().splitlines()) for m in modules()}
    assert not {m: n for m, n in sizes.items() if n > 420}
