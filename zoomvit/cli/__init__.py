"""The `zoomvit` command: explain, zoom, prune, eval and serve. Thin wrappers: every computation is a library call.

With --json each command prints exactly one JSON object on stdout. A user error (unreadable image, unknown
class, bad option value) prints one line, `zoomvit: error: ...`, on stderr and exits with status 2.

Options are checked before the slow model load: ranges at once, blocks and classes against the model's
config.json. The library (torch, transformers) is imported only when a command runs, so --help is instant.
Blocks are numbered 1..L as users see them; keep is a fraction in (0, 1].
"""

from __future__ import annotations

import argparse
import json
import sys

from zoomvit import __version__, checks, config
from zoomvit.app.model_registry import resolve_max_models  # light: the registry loads models lazily
from zoomvit.app.serving import add_serve_options, port_free  # light: the port check, the app's serving concerns
from zoomvit.cli import evaluate, explain, train
from zoomvit.cli.common import UsageError, device_and_dtype
from zoomvit.errors import ZoomViTError


def cmd_serve(args):
    # All before the model load and the gradio import: a bad option would otherwise fail only after both.
    device_and_dtype(args)
    checks.check_port(args.port, "--port")  # 99999 would pass the bind test below (wrapped round) and then crash
    resolve_max_models(args.max_models)
    if not port_free(args.host, args.port):
        raise UsageError(
            f"Cannot serve on {args.host}:{args.port}: the port is in use (or the address is not on this machine); "
            "pick another with --port."
        )
    from zoomvit.app import ui as app  # only now: the web UI pulls in gradio

    app.serve(args)  # the same options as `python app.py` (serving.add_serve_options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoomvit", description="Explain, zoom into and prune a Vision Transformer.")
    parser.add_argument("--version", action="version", version=f"zoomvit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        default=config.resolve_model_name(),
        help=f"hub id or local model folder (default: %(default)s, from ${config.MODEL_ENV_VAR} or built in)",
    )
    common.add_argument(
        "--device",
        default=config.resolve_device_name(),
        help=f"{config.DEVICE_HELP} (default: %(default)s, from ${config.DEVICE_ENV_VAR} or built in)",
    )
    common.add_argument(
        "--dtype",
        default=config.resolve_dtype_name(),
        help=f"{config.DTYPE_HELP} (default: %(default)s, from ${config.DTYPE_ENV_VAR} or built in)",
    )
    explain.add_parsers(commands, common)
    evaluate.add_parser(commands, common)
    p = add_serve_options(commands.add_parser("serve", help="start the web app"))
    p.set_defaults(run=cmd_serve)
    train.add_parser(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # usage errors: argparse prints them and exits with status 2
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # as typed, for what records the command
    try:
        payload = args.run(args)  # a dict with --json; None when the command printed a summary itself
    except Exception as exc:
        if not isinstance(exc, ZoomViTError):
            raise
        print(f"zoomvit: error: {exc}", file=sys.stderr)
        return 2
    if payload is not None:
        print(json.dumps(payload))
    return 0
