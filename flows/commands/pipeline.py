"""`imagenet pipeline [FLAGS]`: run the `imagenet` Prefect flow from the terminal.

Every flow parameter is a flag (the PipelineParams model is the single list): --data_root,
--resize_height, --solver, --max_iter, --stages=convert,mean, --force=convert, ... and the
archive sources --train/--val/--aux/--checksums. `--params FILE` starts from a JSON file of
parameters (the same JSON the Prefect UI shows). Without PREFECT_API_URL the flow runs against
an ephemeral Prefect; with it, the run shows in that server's UI. Prefect's state (PREFECT_HOME:
its database, logs and the JAX compilation cache) goes to DATA_ROOT/.prefect unless the
environment sets PREFECT_HOME: with the data, never in the checkout (prepare(), which runs
before anything imports Prefect).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import sys
import threading
import typing
import warnings
from pathlib import Path
from typing import Any

from flows import prefect_env
from flows.flags import add_flag, parse_bool

SOURCE_FLAGS = ("train", "val", "aux", "checksums")
# How often the terminal pipeline looks whether its temporary Prefect server still runs.
SERVER_POLL_S = 0.5
# How long `imagenet pipeline` waits for the Prefect API that PREFECT_API_URL names to answer
# before it says so (and creates nothing).
API_CHECK_TIMEOUT_S = 10.0
# The flow's default data root (flows/imagenet.py takes it from here): known to prepare()
# without importing Prefect.
DEFAULT_DATA_ROOT = "ilsvrc12-data"
NONE_WORDS = {"none", "null", ""}


# Said in --help (the cli prints the module's summary as the description).
HOME_HELP = ("Prefect's state for this run (PREFECT_HOME: database, logs, JAX compilation "
             "cache) goes to DATA_ROOT/.prefect unless PREFECT_HOME is set; the stage cache "
             "is DATA_ROOT/.prefect-results.")


def prepare(argv: list[str]) -> Path:
    """Point PREFECT_HOME at the data root the flags (or --params) name, before Prefect is
    imported (it reads PREFECT_HOME once, at import); returns the PREFECT_HOME in force. Bad
    flags are left for the real parse to report."""
    if os.environ.get("PREFECT_API_URL") and not {"-h", "--help"} & set(argv):
        # before Prefect is imported: the import creates PREFECT_HOME in an existing data root
        check_api(os.environ["PREFECT_API_URL"])
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--params", default=None)
    add_flag(pre, "data_root", default=None)
    known, _ = pre.parse_known_args(argv)
    data_root = known.data_root
    if data_root is None and known.params:
        try:
            data_root = json.loads(Path(known.params).read_text(encoding="utf-8")).get(
                "data_root")
        except (OSError, ValueError, AttributeError):
            data_root = None  # reported by the real parse
    if not isinstance(data_root, str) or not data_root or "\0" in data_root:
        data_root = DEFAULT_DATA_ROOT  # a NUL byte is reported by the real parse
    prefect_env.configure(PREFECT_HOME=str(prefect_env.pipeline_home(data_root)))
    # Prefect creates its home at import, but not the folders above it: run() creates them
    # once the parameters are known to be good, so --help and a refused command leave no
    # data root behind, and Prefect's warning that it could not create its home is noise.
    warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory")
    return Path(os.environ["PREFECT_HOME"])


def _fields() -> dict[str, Any]:
    prefect_env.configure()
    from flows.imagenet import PipelineParams

    return {k: v for k, v in PipelineParams.model_fields.items() if k != "sources"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = HOME_HELP
    parser.add_argument("--params", type=Path, default=None,
                        help="JSON file of flow parameters to start from (flags override it)")
    for name in SOURCE_FLAGS:
        add_flag(parser, name, default=None, help=f"source of the {name} archive (URL or path)"
                 if name != "checksums" else "md5sum-format file for non-official archives")
    for name, field in _fields().items():
        help_text, metavar = flag_help(name, field)
        add_flag(parser, name, default=None, help=help_text, metavar=metavar)


def flag_help(name: str, field: Any) -> tuple[str, str]:
    """(help, metavar) of the flag of one PipelineParams field: its description, the syntax of
    its value (list fields are comma-separated; --stages/--force name the stages), and its
    default once (unless the description already says it)."""
    from flows.imagenet import STAGES

    text = field.description or ""
    default = field.get_default(call_default_factory=True)
    kinds = typing.get_args(field.annotation) or (field.annotation,)
    metavar = name.upper()
    if name in ("stages", "force"):
        metavar = "STAGE[,STAGE...]"
        text += f"; comma-separated, from {','.join(STAGES)}"
        default = "all" if default == list(STAGES) else (default or "none")
    elif any(typing.get_origin(k) is list for k in kinds):
        metavar = "ID[,ID...]"
        text += "; comma-separated"
    elif bool in kinds:
        metavar = "true|false"
    elif int in kinds:
        metavar = "N"
    elif float in kinds:
        metavar = "X"
    if "default" not in text and default is not None:
        text += f" (default: {default})"
    return text, metavar


def _value(name: str, text: str, field: Any) -> Any:
    """A flag's text as the field's type: the flags are text, so they are converted here (a
    number from digits, a list from commas), and the whole set is then checked strictly like
    the JSON of --params and of a deployment run."""
    from pydantic import TypeAdapter, ValidationError

    from data.errors import ImagenetError

    annotation = str(field.annotation)
    if text.strip().lower() in NONE_WORDS and "None" in annotation:
        return None
    if bool in (typing.get_args(field.annotation) or (field.annotation,)):
        return parse_bool(text)
    value: Any = text
    if "list" in annotation:
        value = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return TypeAdapter(field.annotation).validate_python(value)
    except ValidationError as err:
        raise ImagenetError(f"--{name}={text!r}: {describe_validation_error(err, name)}; see "
                            "'imagenet pipeline --help'") from None


def read_params_file(path: Path) -> dict[str, Any]:
    """The JSON object in --params FILE; a file that is missing, not JSON or not an object is
    an ImagenetError naming the file (and line:column for a syntax error)."""
    from data.errors import ImagenetError, from_os_error

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise from_os_error(err, "cannot read --params file") from None
    except UnicodeDecodeError as err:
        raise ImagenetError(f"--params {path}: not UTF-8 text ({err.reason} at byte "
                            f"{err.start}); save it as UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ImagenetError(f"--params {path}:{err.lineno}:{err.colno}: not valid JSON "
                            f"({err.msg}); fix the file (it holds one JSON object of flow "
                            "parameters)") from None
    if not isinstance(data, dict):
        raise ImagenetError(f"--params {path}: holds a JSON {type(data).__name__}, expected an "
                            "object of flow parameters like {\"data_root\": \"data\"}")
    return data


def describe_validation_error(err: Any, field: str = "") -> str:
    """pydantic's multi-line report as one line: 'field: problem (got value)'; ... (`field`
    names what a bare TypeAdapter checked: its report has no field names). Credentials in a
    rejected URL are masked."""
    from data.download import mask_secrets

    parts = []
    for e in err.errors():
        where = field
        for part in e.get("loc", ()):
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else part)
        msg = e.get("msg", "invalid")
        if e.get("type") == "value_error":  # our validators' messages carry their values
            msg, got = msg.removeprefix("Value error, "), ""
        else:
            got = (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict)
                   else "")
        parts.append(f"{where}: {msg}{got}" if where else f"{msg}{got}")
    return mask_secrets("; ".join(parts))


def _refuse_unknown_keys(data: dict[str, Any], where: Path) -> None:
    """A misspelt key in --params FILE would otherwise be dropped without a word."""
    from data.errors import ImagenetError
    from flows.imagenet import PipelineParams, Sources

    for keys, model, prefix in ((data, PipelineParams, ""),
                                (data.get("sources") or {}, Sources, "sources.")):
        if not isinstance(keys, dict):
            continue
        unknown = sorted(set(keys) - set(model.model_fields))
        if unknown:
            raise ImagenetError(f"--params {where}: unknown parameter {prefix + unknown[0]!r}; "
                                f"valid: {', '.join(prefix + k for k in model.model_fields)}")


def build_params(args: argparse.Namespace) -> Any:
    from data.download import hide_url
    from data.errors import ImagenetError
    from flows.imagenet import PipelineParams

    data: dict[str, Any] = read_params_file(args.params) if args.params else {}
    if args.params:
        _refuse_unknown_keys(data, args.params)
    given = {name: getattr(args, name) for name in SOURCE_FLAGS
             if getattr(args, name) is not None}
    sources = data.get("sources")
    if given:
        if not isinstance(sources or {}, dict):
            raise ImagenetError(f"--params {args.params}: sources: expected an object like "
                                f"{{\"train\": URL, \"val\": URL, \"aux\": URL}}, got "
                                f"{hide_url(sources) if isinstance(sources, str) else sources!r}")
        sources = {**(sources or {}), **given}
    if isinstance(sources, dict):
        # A credentialed URL stays in this process (the downloader gets it back); the flow
        # run's parameters, logs and records only ever see its masked form.
        data["sources"] = {k: hide_url(v) if isinstance(v, str) else v
                           for k, v in sources.items()}
    for name, field in _fields().items():
        text = getattr(args, name)
        if text is not None:
            data[name] = _value(name, text, field)
    params = PipelineParams.model_validate(data)
    _refuse_nul(params.model_dump())
    return params


def _refuse_nul(value: Any, name: str = "") -> None:
    """Every string parameter is a path, URL or name: none may hold a NUL byte."""
    from data.errors import ImagenetError

    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_nul(item, f"{name}.{key}" if name else key)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _refuse_nul(item, name)
    elif isinstance(value, str) and "\0" in value:
        from data.download import mask_secrets

        raise ImagenetError(f"parameter {name} {mask_secrets(repr(value))} holds a NUL byte, "
                            "which no path or URL can hold; fix it")


def check_api(url: str | None = None) -> None:
    """Refuse, in one line, a PREFECT_API_URL where no Prefect API answers: every call of the
    run would otherwise fail and be retried, and the run would end as a bug. `url` defaults to
    Prefect's setting (which needs Prefect imported)."""
    import httpx

    from data.download import mask_secrets
    from data.errors import ImagenetError

    if url is None:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
    if not url:
        return
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=API_CHECK_TIMEOUT_S)
    except httpx.HTTPError as err:
        reason = str(err) or type(err).__name__
        raise ImagenetError(
            f"PREFECT_API_URL={mask_secrets(url)}: no Prefect API answers there "
            f"({mask_secrets(reason)}); start it (make up) or unset PREFECT_API_URL to run "
            "with a temporary one; nothing was run or created") from None


def check_writable(data_root: Path, home: Path) -> None:
    """The data root (archives, LMDBs, snapshots, the stage cache) and Prefect's home (its
    database) must be writable: a read-only one used to end, minutes later, in Prefect's
    tracebacks and a bug exit. One line now, before anything starts."""
    from data.atomic import probe_writable
    from data.errors import ImagenetError, os_error_message

    db = home / "prefect.db"
    for folder, what in ((data_root, "data_root"), (home, "Prefect's home (PREFECT_HOME)")):
        try:
            probe_writable(folder)
            if folder == home and db.is_file():
                with open(db, "r+b"):  # the database itself (a read-only file in the home)
                    pass
        except OSError as err:
            raise ImagenetError(f"{what}: " + os_error_message(err, "cannot write in")
                                + " (the pipeline keeps its data and Prefect's database "
                                "there)") from None


def check_database(db: Path) -> None:
    """A Prefect database that SQLite cannot open (a copy cut short, another file in its place)
    made the temporary server retry its start for minutes, printing thousands of lines of
    traceback, then a bug exit. One line now, before the server starts."""
    import sqlite3

    from data.errors import ImagenetError

    if not db.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
                                ) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the schema page
    except sqlite3.Error as err:
        raise ImagenetError(
            f"{db}: Prefect's database is damaged ({err}); it holds only the runs' history (the "
            "data, their manifests and the stage cache are kept elsewhere in the data root): "
            "move it away and run again; nothing was run") from None


def start_temporary_server() -> None:
    """Without PREFECT_API_URL, start the temporary Prefect server Prefect would start on first
    use, made to outlive the signals that stop a run. The terminal sends Ctrl-C to its whole
    foreground process group, server included, and the flow, which snapshots and stops on it,
    then had no API to record that with (~70 refused connections over 4-5 minutes, then a bug
    exit). So the server starts with SIGINT blocked (a child inherits the signal mask), and a
    watcher starts it again, on the same port and database, if something else ends it (a
    SIGTERM sent to the whole group) while the run still needs it. Prefect stops it with
    SIGTERM when this process exits."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    from data.errors import ImagenetError

    if PREFECT_API_URL.value():
        return
    check_database(Path(os.environ["PREFECT_HOME"]) / "prefect.db")
    server = SubprocessASGIServer()  # the instance Prefect's clients use (port None)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        server.start()
    except RuntimeError as err:  # prefect 3.9: "Timed out while attempting to connect ..."
        reason = str(err).split(" stdout:")[0].strip() or type(err).__name__
        raise ImagenetError(
            f"Prefect's temporary server did not start ({reason}); its own messages are "
            "above. Nothing was run; start a server with `make up` and set PREFECT_API_URL, "
            "or give it longer with PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    keeper = _ServerKeeper(server)
    atexit.register(keeper.stop)  # runs before Prefect's own atexit stop (registered first)
    keeper.start()


class _ServerKeeper(threading.Thread):
    """Starts the temporary server again when it ends before this process does."""

    def __init__(self, server: Any) -> None:
        super().__init__(name="prefect-server-keeper", daemon=True)
        self.server, self.stopping = server, threading.Event()

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # inherited by restarts
        while not self.stopping.wait(SERVER_POLL_S):
            process = self.server.server_process
            if process is None or process.poll() is None or self.stopping.is_set():
                continue
            print(f"imagenet pipeline: the temporary Prefect server ended (exit status "
                  f"{process.returncode}); starting it again on {self.server.address}",
                  file=sys.stderr)
            # SubprocessASGIServer's own launcher (prefect 3.9: the same port and database)
            self.server.server_process = self.server._run_uvicorn_command()


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from data.errors import ImagenetError
    from tasks.report import format_text_table

    try:
        params = build_params(args)
    except ValidationError as err:
        raise ImagenetError(f"bad pipeline parameters: {describe_validation_error(err)}; see "
                            "'imagenet pipeline --help'") from None
    from flows.imagenet import imagenet
    from tasks.report import sig

    check_api()  # a dead PREFECT_API_URL: one line, before anything is created
    check_writable(Path(params.data_root), Path(os.environ["PREFECT_HOME"]))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # see prepare()
    start_temporary_server()
    state = imagenet(**params.flow_parameters(), return_state=True)
    if state.is_cancelled():  # Ctrl-C or SIGTERM during training: snapshotted, then stopped
        print(f"imagenet pipeline: {state.message}", file=sys.stderr)
        from flows.cli import EXIT_INTERRUPTED, EXIT_TERMINATED

        return EXIT_TERMINATED if "SIGTERM" in (state.message or "") else EXIT_INTERRUPTED
    if not state.is_completed():
        # The flow's state message is its one line: "stage convert-train: ..."
        raise ImagenetError(state.message or f"the flow run ended {state.name}")
    result = state.result()
    print(format_text_table(result["stages"]))
    if result.get("top1") is not None:
        print(f"top-1 = {sig(result['top1'])}, top-5 = {sig(result['top5'])}")
    return 0
