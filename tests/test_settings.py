"""Settings that say no: every flag and CELLSTREAM_* variable is checked before anything starts, and
a bad value or a failed start is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

from cellstream.config import ENV_PREFIX, SettingError, Settings, default_of, rule_of, settings_from
from cellstream.tools.cli import build_parser
from support import MODELS

PARSER = build_parser()
INTEGERS = [f.name for f in dataclasses.fields(Settings) if f.type == "int"]
SECONDS = [f.name for f in dataclasses.fields(Settings) if f.type == "float"]
# Sizes and counts for which 0 would mean nothing can work.
POSITIVE = [
    "max_batch",
    "stream_window",
    "max_message_bytes",
    "max_connections",
    "compute_threads",
    "intra_op_threads",
    "snapshot_chunk_rows",
    "snapshot_keep",
    "max_batch_request",
    "max_import_bytes",
]
# 0 keeps the meaning the README gives it: no limit, never, off, only the final snapshot, no wait.
ZERO_MEANS_SOMETHING = [
    "max_queue",
    "max_streams",
    "inline_batch",
    "stream_ttl",
    "model_poll_interval",
    "snapshot_interval",
    "connection_idle_timeout",
    "drain_seconds",
]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse(*flags: str, **env: str) -> Settings:
    """Settings from `cellstream serve FLAGS` with CELLSTREAM_<NAME> variables given by name."""
    args = PARSER.parse_args(["serve", *flags])
    return settings_from(args, {ENV_PREFIX + name.upper(): value for name, value in env.items()})


def refusal(*flags: str, **env: str) -> str:
    with pytest.raises(SettingError) as info:
        parse(*flags, **env)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the rules, in-process -------------------------------------------------------------------


def test_every_setting_has_a_rule_and_its_default_obeys_it() -> None:
    """The rules live on the fields: a setting added without one fails here."""
    for setting in dataclasses.fields(Settings):
        rule_of(setting).check(default_of(setting))


def test_no_flags_and_no_variables_give_the_defaults() -> None:
    assert parse() == Settings()


def test_flags_win_over_variables_which_win_over_defaults() -> None:
    assert parse("--max-batch", "5", max_batch="3").max_batch == 5
    assert parse(max_batch="3").max_batch == 3
    assert parse("--no-tune-malloc", tune_malloc="true").tune_malloc is False
    assert parse("--evict", "lru", evict="none").evict == "lru"


def test_a_bad_variable_is_refused_even_when_no_flag_is_given() -> None:
    assert refusal(max_batch="many") == "CELLSTREAM_MAX_BATCH='many': must be an integer >= 1 (--max-batch)"


def test_a_flag_hides_a_bad_variable() -> None:
    assert parse("--max-batch", "4", max_batch="many").max_batch == 4


def test_the_message_names_the_flag_and_the_variable() -> None:
    assert refusal("--evict", "sometimes") == "--evict 'sometimes': choose none or lru (CELLSTREAM_EVICT)"
    assert refusal(evict="sometimes") == "CELLSTREAM_EVICT='sometimes': choose none or lru (--evict)"


def test_a_value_with_a_newline_still_makes_one_line() -> None:
    assert "'lru\\nnone'" in refusal(evict="lru\nnone")


@pytest.mark.parametrize(
    ("name", "good", "bad"), [("evict", "lru", "LRU"), ("event_loop", "asyncio", "trio")]
)
def test_choices_take_only_their_words(name: str, good: str, bad: str) -> None:
    assert getattr(parse(flag(name), good), name) == good
    assert "choose" in refusal(flag(name), bad)


@pytest.mark.skipif(find_spec("uvloop") is not None, reason="uvloop is installed here")
def test_uvloop_without_the_extra_is_refused_with_the_remedy() -> None:
    assert "pip install 'cellstream[uvloop]'" in refusal("--event-loop", "uvloop")


@pytest.mark.parametrize("level", ["debug", "Info", "WARNING", "error", "critical"])
def test_log_levels_in_any_case(level: str) -> None:
    assert parse("--log-level", level).log_level == level.upper()
    assert parse(log_level=level).log_level == level.upper()


def test_other_log_levels_are_refused() -> None:
    assert refusal("--log-level", "verbose") == (
        "--log-level 'verbose': choose DEBUG, INFO, WARNING, ERROR or CRITICAL, in any case "
        "(CELLSTREAM_LOG_LEVEL)"
    )


def test_a_switch_alone_is_true_and_its_no_form_false() -> None:
    assert parse("--migrate-streams").migrate_streams is True
    assert parse("--no-migrate-streams").migrate_streams is False
    assert parse("--no-tune-malloc").tune_malloc is False
    assert parse("--migrate-streams", "--max-batch", "3").migrate_streams is True
    assert parse("--migrate-streams", "true").migrate_streams is True  # the older spelling still works
    assert parse("--tune-malloc", "off").tune_malloc is False


@pytest.mark.parametrize(
    ("word", "value"),
    [
        *[(w, True) for w in ("true", "1", "yes", "on", "TRUE", "Yes")],
        *[(w, False) for w in ("false", "0", "no", "off", "False", "OFF")],
    ],
)
def test_switch_variables_take_the_usual_words(word: str, value: bool) -> None:
    assert parse(migrate_streams=word).migrate_streams is value
    assert parse(tune_malloc=word).tune_malloc is value


@pytest.mark.parametrize("word", ["", "maybe", "2", "enabled", "y"])
def test_other_switch_words_are_errors_not_false(word: str) -> None:
    assert "must be true/false, yes/no, on/off or 1/0" in refusal(migrate_streams=word)
    assert "must be true/false, yes/no, on/off or 1/0" in refusal("--tune-malloc", word)


@pytest.mark.parametrize("raw", ["2.5", "1e3", "ten", "", "0x10"])
def test_integers_must_be_integers(raw: str) -> None:
    assert "must be an integer" in refusal("--max-batch", raw)


@pytest.mark.parametrize("name", INTEGERS + SECONDS)
def test_no_negative_limits_counts_or_intervals(name: str) -> None:
    assert refusal(f"{flag(name)}=-1").startswith(f"{flag(name)} '-1': must be ")


@pytest.mark.parametrize("name", POSITIVE)
def test_sizes_and_counts_must_be_at_least_one(name: str) -> None:
    assert re.search(r"'0': must be an integer (>= 1|1-2147483647) ", refusal(flag(name), "0"))
    assert getattr(parse(flag(name), "1"), name) == 1


@pytest.mark.parametrize("name", ZERO_MEANS_SOMETHING)
def test_zero_keeps_its_documented_meaning(name: str) -> None:
    assert getattr(parse(flag(name), "0"), name) == 0


def test_a_handshake_timeout_of_zero_is_refused() -> None:
    assert "> 0" in refusal("--handshake-timeout", "0")


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "soon"])
def test_seconds_are_finite_numbers(raw: str) -> None:
    assert "must be a number of seconds" in refusal(f"--stream-ttl={raw}")


def test_seconds_take_fractions() -> None:
    assert math.isclose(parse("--drain-seconds", "0.25").drain_seconds, 0.25)


def test_values_grpc_keeps_in_a_c_int_are_bounded() -> None:
    assert parse("--max-message-bytes", str(2**31 - 1)).max_message_bytes == 2**31 - 1
    assert "1-2147483647" in refusal("--max-message-bytes", str(2**31))
    assert "1-2147483647" in refusal("--max-connections", str(2**31))
    assert "<= 2147483" in refusal("--connection-idle-timeout", "3e6")


@pytest.mark.parametrize("good", ["127.0.0.1:0", "0.0.0.0:50051", "localhost:65535", "[::1]:9095"])
def test_addresses_of_the_form_host_port(good: str) -> None:
    assert parse("--address", good, "--metrics-address", good).address == good


@pytest.mark.parametrize(
    "bad", ["localhost", ":50051", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:http", "::1:5", "a b:1"]
)
def test_other_addresses_are_refused(bad: str) -> None:
    assert "must be HOST:PORT with a port 0-65535" in refusal("--address", bad)
    assert "must be HOST:PORT with a port 0-65535, or '' for off" in refusal(metrics_address=bad)


def test_the_grpc_address_cannot_be_empty() -> None:
    assert "must be HOST:PORT" in refusal("--address", "")


def test_an_empty_metrics_address_turns_metrics_off() -> None:
    assert parse("--metrics-address", "").metrics_address == ""


def test_the_models_directory_must_exist_and_be_a_directory(tmp_path: Path) -> None:
    assert parse("--models", str(MODELS)).models == MODELS
    assert refusal("--models", str(tmp_path / "nope")).endswith(": no such directory (CELLSTREAM_MODELS)")
    (tmp_path / "file").write_text("")
    assert "is not a directory" in refusal(models=str(tmp_path / "file"))
    assert "must name a directory" in refusal("--models", "")


def test_the_state_directory_must_be_creatable_without_being_created(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b"
    assert parse("--state-dir", str(nested)).state_dir == nested
    assert not (tmp_path / "a").exists()  # checking is not creating
    assert parse("--state-dir", "").state_dir is None
    (tmp_path / "file").write_text("")
    assert "is not a directory" in refusal("--state-dir", str(tmp_path / "file"))
    assert f"cannot be created: {tmp_path / 'file'} is a file" in refusal(
        state_dir=str(tmp_path / "file" / "s")
    )


def test_the_ready_file_goes_into_an_existing_directory(tmp_path: Path) -> None:
    assert parse("--ready-file", str(tmp_path / "ready.json")).ready_file == tmp_path / "ready.json"
    assert "does not exist" in refusal("--ready-file", str(tmp_path / "nope" / "ready.json"))
    assert "is a directory" in refusal("--ready-file", str(tmp_path))


# --- the real command line -------------------------------------------------------------------


def serve(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m cellstream serve ARGS` to its end; a hung start fails the test after `timeout`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return subprocess.run(
        [sys.executable, "-m", "cellstream", "serve", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_refused(result: subprocess.CompletedProcess[str], line: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.splitlines()[-1] == line, result.stderr


BAD_VALUES = [
    (["--evict", "sometimes"], {}, "--evict 'sometimes': choose none or lru (CELLSTREAM_EVICT)"),
    ([], {"CELLSTREAM_EVICT": "sometimes"}, "CELLSTREAM_EVICT='sometimes': choose none or lru (--evict)"),
    (["--max-batch", "2.5"], {}, "--max-batch '2.5': must be an integer >= 1 (CELLSTREAM_MAX_BATCH)"),
    (["--stream-window", "0"], {}, "--stream-window '0': must be an integer >= 1 (CELLSTREAM_STREAM_WINDOW)"),
    (["--max-queue", "-1"], {}, "--max-queue '-1': must be an integer >= 0 (CELLSTREAM_MAX_QUEUE)"),
    (
        [],
        {"CELLSTREAM_MIGRATE_STREAMS": "perhaps"},
        "CELLSTREAM_MIGRATE_STREAMS='perhaps': must be true/false, yes/no, on/off or 1/0 (--migrate-streams)",
    ),
    (
        ["--log-level", "loud"],
        {},
        "--log-level 'loud': choose DEBUG, INFO, WARNING, ERROR or CRITICAL, in any case "
        "(CELLSTREAM_LOG_LEVEL)",
    ),
    (
        ["--address", "127.0.0.1:99999"],
        {},
        "--address '127.0.0.1:99999': must be HOST:PORT with a port 0-65535 (CELLSTREAM_ADDRESS)",
    ),
    (
        ["--snapshot-interval", "nan"],
        {},
        "--snapshot-interval 'nan': must be a number of seconds >= 0 (CELLSTREAM_SNAPSHOT_INTERVAL)",
    ),
    (
        ["--max-batch"],
        {},
        "cellstream serve: argument --max-batch: expected one argument (see cellstream serve --help)",
    ),
    (["--max-bach", "3"], {}, "cellstream: unrecognized arguments: --max-bach 3 (see cellstream --help)"),
]


@pytest.mark.parametrize(
    ("args", "env", "line"), BAD_VALUES, ids=[" ".join(args) or ",".join(env) for args, env, _ in BAD_VALUES]
)
def test_a_bad_value_exits_2_with_one_line_and_no_traceback(
    args: list[str], env: dict[str, str], line: str
) -> None:
    result = serve(*args, env=env, timeout=30)
    assert result.returncode == 2
    prefixed = line if line.startswith("cellstream") else f"cellstream serve: {line}"
    assert result.stderr == prefixed + "\n"
    assert result.stdout == ""


def test_a_missing_models_directory_exits_2_naming_the_flag(tmp_path: Path) -> None:
    missing = tmp_path / "no-models"
    result = serve("--models", str(missing), "--address", "127.0.0.1:0", "--metrics-address", "")
    assert_refused(result, f"cellstream serve: --models '{missing}': no such directory (CELLSTREAM_MODELS)")


def test_a_state_directory_that_cannot_be_created_exits_2_naming_the_flag(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    state = tmp_path / "file" / "state"
    result = serve("--models", str(MODELS), "--state-dir", str(state), "--metrics-address", "")
    assert_refused(
        result,
        f"cellstream serve: --state-dir '{state}': cannot be created: {tmp_path / 'file'} is a file "
        "(CELLSTREAM_STATE_DIR)",
    )


def test_serve_help_shows_every_setting_with_its_default() -> None:
    result = serve("--help", timeout=30)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for setting in dataclasses.fields(Settings):
        env = ENV_PREFIX + setting.name.upper()
        assert flag(setting.name) in text and f"[{env}]" in text, setting.name
    for shown in ("default 2048 [CELLSTREAM_MAX_BATCH]", "default none [CELLSTREAM_EVICT]"):
        assert shown in text
    assert "default 127.0.0.1:50051 [CELLSTREAM_ADDRESS]" in text
    assert "default false [CELLSTREAM_MIGRATE_STREAMS]" in text and "--no-migrate-streams" in text
    assert "default 30 [CELLSTREAM_SNAPSHOT_INTERVAL]" in text


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_grpc_port_in_use_exits_2_naming_the_address_and_the_flag(tmp_path: Path, busy_port: int) -> None:
    address = f"127.0.0.1:{busy_port}"
    ready = tmp_path / "ready.json"
    result = serve(
        "--models", str(MODELS), "--address", address, "--metrics-address", "", "--ready-file", str(ready)
    )
    line = (
        f"cellstream: cannot serve: cannot listen on {address} (Address already in use): "
        "choose another address with --address (CELLSTREAM_ADDRESS)"
    )
    assert_refused(result, line)
    # Besides the INFO lines of the models loaded, only gRPC's own log line of the failed bind.
    others = [x for x in result.stderr.splitlines() if " INFO " not in x and "add_port.cc" not in x]
    assert others == [line]
    assert not ready.exists()


def test_metrics_port_in_use_exits_2_naming_the_address_and_the_flag(tmp_path: Path, busy_port: int) -> None:
    address = f"127.0.0.1:{busy_port}"
    ready = tmp_path / "ready.json"
    result = serve(
        "--models",
        str(MODELS),
        "--address",
        "127.0.0.1:0",
        "--metrics-address",
        address,
        "--ready-file",
        str(ready),
        "--log-level",
        "warning",
    )
    assert_refused(
        result,
        f"cellstream: cannot serve: cannot serve metrics on {address} (Address already in use): "
        "choose another address with --metrics-address (CELLSTREAM_METRICS_ADDRESS), or '' for none",
    )
    assert result.stderr.count("\n") == 1  # the gRPC server it had started stops without a word
    assert not ready.exists()
