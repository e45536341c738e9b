"""`imagenet pipeline [FLAGS]`: run the `imagenet` Prefect flow from the terminal.

Every flow parameter is a flag (the PipelineParams model is the single list): --data_root,
--resize_height, --solver, --max_iter, --stages=convert,mean, --force=convert, ... and the
archive sources --train/--val/--aux/--checksums. `--params FILE` starts from a JSON file of
parameters (the same JSON the Prefect UI shows). Without PREFECT_API_URL the flow runs against
an ephemeral Prefect (project-local PREFECT_HOME); with it, the run shows in that server's UI.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from flows import prefect_env
from flows.flags import add_flag, parse_bool

SOURCE_FLAGS = ("train", "val", "aux", "checksums")
NONE_WORDS = {"none", "null", ""}


def _fields() -> dict[str, Any]:
    prefect_env.configure()
    from flows.imagenet import PipelineParams

    return {k: v for k, v in PipelineParams.model_fields.items() if k != "sources"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, default=None,
                        help="JSON file of flow parameters to start from (flags override it)")
    for name in SOURCE_FLAGS:
        add_flag(parser, name, default=None, help=f"source of the {name} archive (URL or path)"
                 if name != "checksums" else "md5sum-format file for non-official archives")
    for name, field in _fields().items():
        help_text = (field.description or "") + f" (default: {field.get_default(call_default_factory=True)})"
        add_flag(parser, name, default=None, help=help_text)


def _value(name: str, text: str, field: Any) -> Any:
    annotation = str(field.annotation)
    if text.strip().lower() in NONE_WORDS and "None" in annotation:
        return None
    if "list" in annotation:
        return [part.strip() for part in text.split(",") if part.strip()]
    if field.annotation is bool:
        return parse_bool(text)
    return text  # pydantic converts (and rejects) ints


def build_params(args: argparse.Namespace) -> Any:
    from flows.imagenet import PipelineParams

    data: dict[str, Any] = json.loads(args.params.read_text()) if args.params else {}
    sources = dict(data.get("sources") or {})
    for name in SOURCE_FLAGS:
        if getattr(args, name) is not None:
            sources[name] = getattr(args, name)
    if sources:
        data["sources"] = sources
    for name, field in _fields().items():
        text = getattr(args, name)
        if text is not None:
            data[name] = _value(name, text, field)
    return PipelineParams.model_validate(data)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from data.errors import ImagenetError
    from tasks.report import format_text_table

    try:
        params = build_params(args)
    except ValidationError as err:
        raise ImagenetError(f"bad parameters: {err}") from err
    from flows.imagenet import imagenet

    result = imagenet(params=params)
    print(format_text_table(result["stages"]))
    if result.get("top1") is not None:
        print(f"top-1 = {result['top1']:.4f}, top-5 = {result['top5']:.4f}")
    return 0
