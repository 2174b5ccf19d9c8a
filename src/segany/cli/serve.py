"""`segany serve PROJECT_DIR_OR_DB_URL`: the annotation server and browser app (data-engine stages 1–2)."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segany.errors import InputError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run the annotation server and web app",
                              description="Serve the browser annotation tool for a project folder or database URL.")
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="PROJECT_DIR_OR_DB_URL",
                   help="project folder (SQLite inside) or a database URL such as postgresql://user@host/db")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535 (default 8000)")
    p.add_argument("--project", default=None, help="project name in the store (default: the first one)")
    p.add_argument("--model", default=None,
                   help="registered model name (see `segany models`; default: the project's current model, after "
                        "`segany engine retrain`, else segany_tiny, shipped with segany)")
    p.add_argument("--checkpoint", default=None,
                   help="weights file; default: with --model, that model's weights shipped with segany (segany_tiny) "
                        "or downloaded; without, the project's current model; else random weights")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-model", action="store_true", help="serve the store only (no embeddings or decoding)")
    p.add_argument("--cache-size", type=_positive_int, default=16, help="image embeddings kept in memory (>= 1)")
    p.add_argument("--max-upload-mb", type=_positive_float, default=32.0, help="largest accepted request body (> 0)")
    p.add_argument("--create", action="store_true",
                   help="create the project (folder or database tables, and a project named --project or after "
                        "the folder) if it does not exist")
    from segany.cli._util import add_speed_arguments

    add_speed_arguments(p)


def _whole_number(low: int, high: float, expected: str) -> Callable[[str], int]:
    """An argparse ``type`` for a whole number in [low, high]; anything else is a usage error saying ``expected``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
        return value

    return parse


_port = _whole_number(1, 65535, "must be a whole number from 1 to 65535")
_positive_int = _whole_number(1, float("inf"), "expected a whole number >= 1")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _default_checkpoint(model: str) -> str | None:
    from segany.checkpoints import find_weights
    from segany.registry import get_model_info

    info = get_model_info(model)  # unknown names raise with suggestions
    found = find_weights(info.weights) if info.weights else None
    return str(found) if found else None


def _model_service(args: argparse.Namespace, model_name: str, ckpt: str | None, device: str,
                   options: dict[str, Any], cache_dir: Path | None) -> Any:
    """A model service whose weights file was read and checked against the model (CheckpointError if not)."""
    from segany.server.model_service import ModelService

    model = ModelService(model_name, ckpt, device=device, cache_size=args.cache_size, cache_dir=cache_dir,
                         predictor_options=options)
    model.check_weights()
    return model


def build_app(args: argparse.Namespace) -> Any:
    """The app for ``args``; every option, the device and the weights are checked before anything is created."""
    from segany.engine.retrain import DEFAULT_MODEL
    from segany.engine.store import paths_open_would_create, remove_paths
    from segany.server.app import ServerSettings, create_app

    options: dict[str, Any] = {}
    device = "cpu"
    model = None
    if not args.no_model:  # a combination that cannot run fails before the store is opened
        from segany.cli._util import predictor_options, resolve_checkpoint, resolve_device

        device = resolve_device(args.device)  # refused now, not at the first request
        options = predictor_options(args, device)
        if args.checkpoint is not None:  # read and checked now, before a project is created
            name = args.model or DEFAULT_MODEL
            ckpt = str(resolve_checkpoint(name, args.checkpoint))  # the same check as every command's
            model = _model_service(args, name, ckpt, device, options, None)
        elif args.model is not None:
            from segany.registry import get_model_info

            get_model_info(args.model)  # unknown names raise with suggestions
    made = paths_open_would_create(args.target) if args.create else []
    store = None
    try:
        store = _open(args)
        cache_dir = (store.project_dir / ".cache") if store.project_dir else None
        if model is not None:
            model.cache_dir = cache_dir
        elif not args.no_model:
            # --model names what to serve, as in `segany engine`; without it the project's current model
            # (promoted by `segany engine retrain`) comes first
            from segany.engine.retrain import current_model

            model_name, ckpt = args.model or DEFAULT_MODEL, None
            cur = current_model(store, args.project) if args.model is None else None
            if cur is not None and cur["checkpoint_path"]:
                model_name, ckpt = cur["model_type"], cur["checkpoint_path"]
            ckpt = ckpt or _default_checkpoint(model_name)
            if ckpt is None:
                print(f"[segany] no weights for {model_name} found: serving RANDOM weights (masks are meaningless); "
                      "pass --checkpoint FILE or run `segany download`", file=sys.stderr)
            model = _model_service(args, model_name, ckpt, device, options, cache_dir)
        settings = ServerSettings(project=args.project, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
        return create_app(store, model, settings)
    except BaseException:
        if store is not None:
            store.close()
        remove_paths(made)  # nothing half-made: what --create made in this call goes again
        raise


def _open(args: argparse.Namespace) -> Any:
    """Open the store; with --create, also make the project when the store does not have it."""
    from segany.engine.store import NotFoundError, open_store

    store = open_store(args.target, create=args.create)
    try:
        store.get_project(args.project)
    except NotFoundError:
        if not args.create:
            raise
        name = args.project or (store.project_dir.name if store.project_dir else "default")
        media = str(store.project_dir / "images") if store.project_dir else None
        store.create_project(name, media_dir=media)
        print(f"[segany] created project {name!r} in {store.url}", file=sys.stderr)
    return store


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or an InputError naming the port when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"--host {host!r} is not an address of this machine ({exc.strerror}); "
                         "use 127.0.0.1, 0.0.0.0 or a local interface's address") from exc
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts need no wait
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is already in use (another server is running there?); "
                             f"pick another with --port, e.g. --port {port + 1 if port < 65535 else 8000}") from exc
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from exc
    return sock


def run(args: argparse.Namespace) -> int:
    from segany.errors import require

    require("uvicorn", "server")
    import uvicorn

    sock = _bind(args.host, args.port)  # before the store is opened (or created): a taken port makes nothing
    try:
        app = build_app(args)
        print(f"[segany] serving {app.state.store.url} on http://{args.host}:{args.port}/ "
              "(open it with #token=YOUR_TOKEN appended, or paste the token)", file=sys.stderr)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="segany serve")
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
