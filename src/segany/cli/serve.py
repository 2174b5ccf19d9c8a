"""`segany serve PROJECT_DIR_OR_DB_URL`: the annotation server and browser app (data-engine stages 1–2)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


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
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--project", default=None, help="project name in the store (default: the first one)")
    p.add_argument("--model", default="segany_tiny",
                   help="registered model name (see `segany models`; default segany_tiny, shipped with segany)")
    p.add_argument("--checkpoint", default=None,
                   help="weights file; default: the model's cached official weights if present, else random weights")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-model", action="store_true", help="serve the store only (no embeddings or decoding)")
    p.add_argument("--cache-size", type=int, default=16, help="image embeddings kept in memory")
    p.add_argument("--max-upload-mb", type=float, default=32.0, help="largest accepted request body")
    p.add_argument("--create", action="store_true", help="create the project folder if it does not exist")
    from segany.cli._util import add_speed_arguments

    add_speed_arguments(p)


def _default_checkpoint(model: str) -> str | None:
    from segany.checkpoints import find_weights
    from segany.registry import get_model_info

    info = get_model_info(model)  # unknown names raise with suggestions
    found = find_weights(info.weights) if info.weights else None
    return str(found) if found else None


def build_app(args: argparse.Namespace) -> Any:
    from segany.engine.store import open_store
    from segany.server.app import ServerSettings, create_app
    from segany.server.model_service import ModelService

    options: dict[str, Any] = {}
    if not args.no_model:  # a combination that cannot run fails before the store is opened
        import torch

        from segany.cli._util import predictor_options

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        options = predictor_options(args, device)
    store = open_store(args.target, create=args.create)
    model = None
    if not args.no_model:
        model_name, ckpt = args.model, args.checkpoint
        if ckpt is None:  # the project's current model (promoted by `segany engine retrain`) comes first
            from segany.engine.retrain import current_model

            cur = current_model(store, args.project)
            if cur is not None and cur["checkpoint_path"]:
                model_name, ckpt = cur["model_type"], cur["checkpoint_path"]
        ckpt = ckpt or _default_checkpoint(model_name)
        if ckpt is None:
            print(f"[segany] no weights for {args.model} found: serving RANDOM weights (masks are meaningless); "
                  "pass --checkpoint FILE or run `segany download`", file=sys.stderr)
        cache_dir = (store.project_dir / ".cache") if store.project_dir else None
        model = ModelService(model_name, ckpt, device=args.device, cache_size=args.cache_size, cache_dir=cache_dir,
                             predictor_options=options)
    settings = ServerSettings(project=args.project, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    return create_app(store, model, settings)


def run(args: argparse.Namespace) -> int:
    from segany.errors import require

    require("uvicorn", "server")
    import uvicorn

    app = build_app(args)
    print(f"[segany] serving {app.state.store.url} on http://{args.host}:{args.port}/ "
          "(open it with #token=YOUR_TOKEN appended, or paste the token)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="segany serve")
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
