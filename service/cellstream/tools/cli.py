"""`cellstream serve | health | models | state | auth | cluster` — argument parsing only; the work
lives elsewhere."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from cellstream import __version__
from cellstream.tools.client_options import add_client_arguments, call_failed, client_from

EXIT_FAILED = 1
EXIT_USAGE = 2


def _serve(args: argparse.Namespace) -> int:
    from cellstream.config import SettingError, settings_from  # noqa: PLC0415 - keep `--help` fast

    try:
        settings = settings_from(args)
    except SettingError as exc:  # refused before anything (even the server's imports) starts
        print(f"cellstream serve: {exc}", file=sys.stderr)
        return 2
    from cellstream.errors import ModelLoadError  # noqa: PLC0415
    from cellstream.server import run  # noqa: PLC0415

    try:
        return run(settings)
    except (ModelLoadError, SettingError) as exc:  # a start-up failure: one line, no traceback
        print(f"cellstream: cannot serve: {exc}", file=sys.stderr)
        return 2


def _refused(command: str, problem: object) -> int:
    """A command that cannot start (a TLS file, a token, a path): one line, exit 2."""
    print(f"cellstream {command}: {problem}", file=sys.stderr)
    return EXIT_USAGE


def _health(args: argparse.Namespace) -> int:
    import grpc  # noqa: PLC0415

    try:
        client = client_from(args)
    except ValueError as exc:
        return _refused("health", exc)
    try:
        serving = client.health(args.service)
    except grpc.RpcError as exc:
        print(call_failed(args.address, exc), file=sys.stderr)
        return EXIT_FAILED
    finally:
        client.close()
    print("SERVING" if serving else "NOT_SERVING")
    return 0 if serving else 1


def _models_list(args: argparse.Namespace) -> int:
    from cellstream.config import bundled_models_dir  # noqa: PLC0415
    from cellstream.errors import ModelLoadError  # noqa: PLC0415
    from cellstream.model import ModelRepository  # noqa: PLC0415

    try:
        repository = ModelRepository(args.models or bundled_models_dir(), default_model=args.default_model)
    except ModelLoadError as exc:
        print(f"cellstream: {exc}", file=sys.stderr)
        return 2
    for name, model in repository.models.items():
        states = ", ".join(f"{s.name}{list(s.shape)}" for s in model.states)
        default = " (default)" if name == repository.default else ""
        print(
            f"{name}{default} version {model.version}: reading {model.reading!r} [{model.input_size}], "
            f"answer {model.output!r} [{model.output_size}], states {states}  ({model.path})"
        )
    for refusal in repository.refused:  # newer versions the server would pass over
        print(
            f"cellstream: {refusal.name} version {refusal.version} is not served: {refusal.error}",
            file=sys.stderr,
        )
    return 0


def _state_export(args: argparse.Namespace) -> int:
    import grpc  # noqa: PLC0415

    try:
        client = client_from(args)
    except ValueError as exc:
        return _refused("state export", exc)
    try:
        with client:
            size = client.export_states(args.out, args.model or ())
    except grpc.RpcError as exc:
        print(f"cellstream state export: {call_failed(args.address, exc)}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        return _refused("state export", f"--out '{args.out}': {exc.strerror}")
    print(f"wrote {size} bytes to {args.out}")
    return 0


def _state_import(args: argparse.Namespace) -> int:
    import grpc  # noqa: PLC0415

    try:
        client = client_from(args)
    except ValueError as exc:
        return _refused("state import", exc)
    try:
        with client:
            restored, dropped = client.import_states(args.file)
    except grpc.RpcError as exc:
        print(f"cellstream state import: {call_failed(args.address, exc)}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        return _refused("state import", f"'{args.file}': {exc.strerror}")
    print(f"restored {restored} streams, dropped {dropped} (model not served here or changed)")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit 2: `serve`'s usage alone would fill a screen."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from cellstream.config import add_arguments  # noqa: PLC0415

    parser = OneLineParser(prog="cellstream", description="Streaming inference for recurrent cells.")
    parser.add_argument("--version", action="version", version=f"cellstream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the gRPC server",
        description="Every setting is a flag and a CELLSTREAM_* variable; flags win.",
    )
    add_arguments(serve)
    serve.set_defaults(func=_serve)

    health = commands.add_parser("health", help="exit 0 if the server's gRPC health check says SERVING")
    health.add_argument("--address", default="127.0.0.1:50051")
    health.add_argument("--service", default="")
    health.add_argument("--timeout", type=float, default=3.0)
    add_client_arguments(health)  # the health service needs no token; one given is sent all the same
    health.set_defaults(func=_health)

    models = commands.add_parser("models", help="inspect a model repository")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    listing = model_commands.add_parser("list", help="print the models as the server would serve them")
    listing.add_argument("--models", type=_path, default=None)
    listing.add_argument("--default-model", default="")
    listing.set_defaults(func=_models_list)

    state = commands.add_parser("state", help="move stream states between servers (snapshot files)")
    state_commands = state.add_subparsers(dest="state_command", required=True)
    export = state_commands.add_parser("export", help="write a server's streams to a snapshot file")
    export.add_argument("--address", default="127.0.0.1:50051")
    export.add_argument("--out", type=_path, required=True)
    export.add_argument("--model", action="append", help="only this model (repeatable)")
    export.add_argument("--timeout", type=float, default=300.0)
    add_client_arguments(export)
    export.set_defaults(func=_state_export)
    load = state_commands.add_parser("import", help="load a snapshot file into a server")
    load.add_argument("file", type=_path)
    load.add_argument("--address", default="127.0.0.1:50051")
    load.add_argument("--timeout", type=float, default=300.0)
    add_client_arguments(load)
    load.set_defaults(func=_state_import)

    from cellstream.tools import auth, check, cluster, rebalance, replay  # noqa: PLC0415 - heavy deps are imported lazily

    check.register(model_commands)
    replay.register(commands)
    auth.register(commands)
    rebalance.register(cluster.register(commands))
    return parser


def _path(raw: str) -> object:
    from pathlib import Path  # noqa: PLC0415

    return Path(raw)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
