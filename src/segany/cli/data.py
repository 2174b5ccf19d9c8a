"""``segany data pack``: pack datasets into a small folder that travels to a training machine.

Two kinds of input: the shared datasets (``--data ../shared/data --datasets ...``), or your own data in
one of four layouts (``--coco FILE``, ``--yolo DIR``, ``--masks DIR --images DIR``, ``--sa1b DIR``), split into train
and a seeded held-out "val" part (``--val-fraction``, ``--seed``) that ``segany eval`` uses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from segany.errors import InputError

SHARED_DEFAULT_DATASETS = "coco128,pennfudan,kvasir,bsds"

EPILOG = """\
your own data (one of):
  --coco FILE [--images DIR]   a COCO instances JSON; images under DIR (default: the JSON's folder);
                               polygons and RLE; height/width may be missing (read from the image)
  --yolo DIR [--split NAME]    a YOLO-seg folder: DIR/images/<split>/x.jpg + DIR/labels/<split>/x.txt
                               (lines `class x1 y1 x2 y2 ...`, normalized), class names from DIR/data.yaml;
                               a val/ (valid/, test/) folder beside train/ is kept as the held-out split
  --masks DIR --images DIR     one PNG per object: DIR/<image stem>/<any name>.png, the image's size
                               (any colour nonzero, or >= 128 for 0/255 masks, is the object; transparent
                               is background)
  --sa1b DIR [--images DIR]    per-image SA-1B JSONs (SA-1B's sa_*.json, or what `segany auto` wrote),
                               searched recursively; each image is DIR/file_name with --images DIR (for
                               `segany auto` output: the folder it read), else the file beside its JSON
  Then: segany train CONFIG -o data.pack=OUT -o data.datasets=[NAME]; segany eval --data OUT ...

An interrupted pack resumes: rerun the same command; images already written from the same source
files with the same settings are kept. Packing into a folder that already holds a pack adds to it:
the dataset packed (--name, or each of --datasets) is replaced, every other dataset stays, so your data
and the shared data can share one pack (train with -o 'data.datasets=[bsds,NAME]')."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="dataset tools (pack)", description=__doc__)
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    pk = sub.add_parser("pack", help="pack the shared data or your own: images ≤ 512 px JPEG, masks as RLE, splits",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    pk.add_argument("--out", default="out/packed")
    pk.add_argument("--max-side", type=int, default=512)
    pk.add_argument("--quality", type=int, default=80)
    shared = pk.add_argument_group("the shared datasets")
    shared.add_argument("--data", default=None, help="the shared data folder (default ../shared/data)")
    shared.add_argument("--datasets", default=None, help=f"a subset of {SHARED_DEFAULT_DATASETS} (default all)")
    shared.add_argument("--limit", type=int, default=None, help="images per dataset (quick tries)")
    own = pk.add_argument_group("your own data (see below)")
    own.add_argument("--coco", default=None, metavar="FILE", help="a COCO instances JSON")
    own.add_argument("--yolo", default=None, metavar="DIR", help="a YOLO-seg dataset folder")
    own.add_argument("--masks", default=None, metavar="DIR", help="per-object PNGs, DIR/<image stem>/*.png")
    own.add_argument("--sa1b", default=None, metavar="DIR",
                     help="a folder of per-image SA-1B JSONs (SA-1B, or the --out of `segany auto`)")
    own.add_argument("--images", default=None, metavar="DIR", help="the image folder (--coco, --masks, --sa1b)")
    own.add_argument("--name", default="own", help="dataset name in the pack (default own)")
    own.add_argument("--split", default=None, help="--yolo: pack only images/<SPLIT>/ (default every split)")
    own.add_argument("--categories", default=None, help="--coco/--yolo: keep only these class names, a,b")
    own.add_argument("--val-fraction", type=float, default=0.1, help="held-out share for eval (default 0.1)")
    own.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    own.add_argument("--skip-bad", action="store_true", help="leave out unreadable images (listed) instead of stopping")
    pk.set_defaults(func=run)
    return p


def _is_own(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.coco, args.yolo, args.masks, args.sa1b))


def _check_modes(args: argparse.Namespace) -> None:
    """Own-data and shared-data options do not mix; say which belongs where instead of ignoring one."""
    if _is_own(args):
        mixed = [f for f, v in (("--data", args.data), ("--datasets", args.datasets), ("--limit", args.limit))
                 if v is not None]
        if mixed:
            raise InputError(f"{', '.join(mixed)} pick(s) the shared datasets and do(es) not go with --coco/--yolo/"
                             "--masks/--sa1b; leave them out (name your data with --name)")
        return
    own_only = [f for f, v in (("--images", args.images), ("--split", args.split),
                               ("--categories", args.categories)) if v is not None]
    if own_only:
        raise InputError(f"{', '.join(own_only)} go(es) with your own data; add --coco FILE, --yolo DIR, --masks DIR "
                         "or --sa1b DIR")


def _progress_bar() -> tuple[Any, Any]:
    from tqdm import tqdm

    state: dict[str, Any] = {"bar": None}

    def progress(n: int) -> None:
        if state["bar"] is None:  # made on the first image, so errors in the options print no empty bar
            state["bar"] = tqdm(unit="img", desc="pack", file=sys.stderr, mininterval=1.0)
        state["bar"].update(n)

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return progress, close


def _pack(args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    from segany.cli._util import comma_list
    from segany.data.pack import pack_own, pack_shared

    if _is_own(args):
        return pack_own(args.out, coco=args.coco, yolo=args.yolo, masks=args.masks, sa1b=args.sa1b, images=args.images,
                        name=args.name, split=args.split,
                        categories=comma_list(args.categories) if args.categories is not None else None,
                        val_fraction=args.val_fraction, seed=args.seed, skip_bad=args.skip_bad,
                        max_side=args.max_side, quality=args.quality, progress=progress)
    data = args.data if args.data is not None else str(Path("..") / "shared" / "data")
    def skipped(message: str) -> None:  # --skip-bad was ignored with the shared data; an image is named as it goes
        print(f"[segany] left out {message}", file=sys.stderr, flush=True)

    return pack_shared(data, args.out, datasets=comma_list(args.datasets or SHARED_DEFAULT_DATASETS),
                       max_side=args.max_side, quality=args.quality, limit=args.limit, progress=progress,
                       on_bad=skipped if args.skip_bad else None)


def run(args: argparse.Namespace) -> int:
    from segany.cli._checks import check_out_dir

    _check_modes(args)
    check_out_dir(args.out, "--out")
    progress, close = _progress_bar()
    try:
        manifest = _pack(args, progress)
    except KeyboardInterrupt:
        close()
        print(f"segany: interrupted; images written so far stay in {args.out}; rerun the same command to resume",
              file=sys.stderr)
        return 130
    close()
    _print_summary(args, manifest)
    return 0


def _merge_note(manifest: dict[str, Any]) -> str:
    """What packing did to a pack that was already there: nothing to say for a new one."""
    parts = [f"{', '.join(manifest[key])} {verb}" for key, verb in (("replaced", "replaced"),
                                                                    ("kept", "kept unchanged"))
             if manifest.get(key)]
    return f" ({'; '.join(parts)})" if parts else ""


def _print_summary(args: argparse.Namespace, manifest: dict[str, Any]) -> None:
    report = manifest.get("report")
    if report is not None:
        for line in report.notes:
            print(f"segany: warning: {line}", file=sys.stderr)
        for line in report.bad:
            print(f"segany: skipped: {line}", file=sys.stderr)
    if manifest.get("dropped_small"):
        print(f"segany: warning: {manifest['dropped_small']} mask(s) under 16 px after resizing to --max-side "
              f"{args.max_side} were left out", file=sys.stderr)
    for name, sp in manifest["splits"].items():
        print(f"{name:10s} train {len(sp['train']):4d}  val {len(sp['val']):4d}")
    print(f"the pack {args.out} now holds {', '.join(manifest['splits'])}{_merge_note(manifest)}")
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    reused = f" ({manifest['reused']} kept from an earlier run)" if manifest.get("reused") else ""
    skipped = f", {len(report.bad)} skipped" if report is not None and report.bad else ""
    print(f"{len(manifest['records'])} images{reused}{skipped}, {size / 1e6:.1f} MB in {args.out}")
    if _is_own(args):
        others = [n for n in manifest["splits"] if n != args.name]
        both = f" (with the rest: -o 'data.datasets=[{','.join([*others, args.name])}]')" if others else ""
        print(f"train: segany train CONFIG -o data.pack={args.out} -o 'data.datasets=[{args.name}]'{both}\n"
              f"eval:  segany eval --data {args.out} --checkpoint CKPT")
