"""`segany project ...`: create a project, add images and annotators, export and import annotations."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXPORTS = ("coco", "coco-polygons", "sa1b", "yolo", "png")
ROLES = ("annotator", "reviewer", "admin")  # segany.engine.db.ROLES, without importing SQLAlchemy for --help
ROLES_HELP = ("annotator: own masks and machine proposals; reviewer: also accepts, rejects and deletes anyone's; "
              "admin: also changes the project (stage, labels, images)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("project", help="create and manage annotation projects",
                              description="Create and manage data-engine projects (a folder or a database URL).")
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="project_cmd", required=True, metavar="COMMAND")
    c = sub.add_parser("create", help="create a project (folder with a SQLite store, or in a database URL)")
    c.add_argument("target", metavar="DIR_OR_DB_URL")
    c.add_argument("--name", default=None, help="project name (default: the folder name)")
    c.add_argument("--labels", default="", help="comma-separated label names")
    c.add_argument("--stage", choices=("manual", "semi", "auto"), default="manual",
                   help="manual: clicks only; semi: the app pre-fills confident masks for review")
    c.add_argument("--samples", action="store_true", help="also add the bundled sample images")
    a = sub.add_parser("add-images", help="register image files or folders")
    a.add_argument("target", metavar="DIR_OR_DB_URL")
    a.add_argument("paths", nargs="+")
    a.add_argument("--project", default=None)
    a.add_argument("--skip-invalid", action="store_true",
                   help="add the readable images and list the unreadable ones (default: add nothing, list them)")
    rm = sub.add_parser("remove-images", help="unregister images (by id, path or file name) and their annotations; "
                        "the files stay")
    rm.add_argument("target", metavar="DIR_OR_DB_URL")
    rm.add_argument("images", nargs="+", metavar="IMAGE")
    rm.add_argument("--project", default=None)
    t = sub.add_parser("add-annotator", help="create an annotator and print their token")
    t.add_argument("target", metavar="DIR_OR_DB_URL")
    t.add_argument("name")
    t.add_argument("--role", choices=ROLES, default=None,
                   help=f"what they may do (default annotator; with --rotate: unchanged). {ROLES_HELP}")
    t.add_argument("--rotate", action="store_true", help="issue a new token for an existing annotator")
    r = sub.add_parser("set-role", help="change an annotator's role", description=f"Roles: {ROLES_HELP}.")
    r.add_argument("target", metavar="DIR_OR_DB_URL")
    r.add_argument("name")
    r.add_argument("role", choices=ROLES)
    n = sub.add_parser("annotators", help="list annotators with their roles")
    n.add_argument("target", metavar="DIR_OR_DB_URL")
    e = sub.add_parser("export", help="export accepted annotations")
    e.add_argument("target", metavar="DIR_OR_DB_URL")
    e.add_argument("format", choices=EXPORTS)
    e.add_argument("out", help="output file (coco) or folder")
    e.add_argument("--project", default=None)
    e.add_argument("--force", action="store_true",
                   help="replace an output that is not an earlier segany export (a folder's files are deleted), "
                        "or an earlier export folder holding files it did not write; an earlier export is "
                        "replaced without it. Never replaced, even with --force: the project's database, media "
                        "folder or registered images, the current folder, and the COCO file the project "
                        "imported from")
    i = sub.add_parser("import-coco", help="import COCO instance annotations")
    i.add_argument("target", metavar="DIR_OR_DB_URL")
    i.add_argument("coco_json")
    i.add_argument("--images-dir", default=None, help="folder holding images the project does not have yet")
    i.add_argument("--project", default=None)
    i.add_argument("--include-crowd", action="store_true",
                   help="also import iscrowd=1 regions as ordinary masks (default: skip and count them)")
    i.add_argument("--restore-deleted", action="store_true",
                   help="also bring back annotations of the file deleted in the project since an earlier import "
                        "(default: they stay deleted, and are counted)")
    s = sub.add_parser("stats", help="images, annotations and seconds per mask")
    s.add_argument("target", metavar="DIR_OR_DB_URL")
    s.add_argument("--project", default=None)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from segany.cli._util import comma_list
    from segany.engine import exports
    from segany.engine.store import open_store, paths_open_would_create, remove_paths

    cmd = args.project_cmd
    made = paths_open_would_create(args.target) if cmd == "create" else []
    store = open_store(args.target, create=cmd == "create")
    try:
        if cmd == "create":
            name = args.name or (store.project_dir.name if store.project_dir else "default")
            media = str(store.project_dir / "images") if store.project_dir else None
            labels = comma_list(args.labels)
            proj = store.create_project(name, media_dir=media, labels=labels, stage=args.stage)
            print(f"created project {proj['name']!r} in {store.url}")
            if args.samples:
                samples = Path(__file__).resolve().parents[1] / "assets" / "samples"
                print(f"added {len(store.add_images(proj['id'], [samples]))} sample images")
            return 0
        if cmd == "add-annotator":
            if args.rotate:
                token = store.rotate_token(args.name)
                role = store.set_role(args.name, args.role)["role"] if args.role else None
            else:
                role = args.role or "annotator"
                token = store.add_annotator(args.name, role=role)
            print(token)
            print(f"(token for {args.name}{f' ({role})' if role else ''}: shown once; open the app at "
                  f"http://HOST:PORT/#token={token})", file=sys.stderr)
            return 0
        if cmd == "set-role":
            old = {a["name"]: a["role"] for a in store.list_annotators()}.get(args.name)
            who = store.set_role(args.name, args.role)
            print(f"{who['name']}: {old} -> {who['role']} (running servers apply it within 30 s)")
            return 0
        if cmd == "annotators":
            for a in store.list_annotators():
                print(f"{a['name']}\t{a['role']}" + ("" if a["active"] else "\tinactive"))
            return 0
        proj = store.get_project(args.project)
        if cmd == "add-images":
            from segany.engine.store import collect_image_files

            files = collect_image_files(args.paths)  # walked once; the store takes the files as they are
            added, bad = store.add_images_report(proj["id"], files, skip_invalid=args.skip_invalid)
            present = len(files) - len(added) - len(bad)  # the store skips content it holds (or was given twice)
            print(f"added {len(added)} images to {proj['name']!r}"
                  + (f", {present} already registered (same content)" if present else "")
                  + (f", skipped {len(bad)} unreadable: " + "; ".join(f"{f} ({why})" for f, why in bad) if bad else ""))
        elif cmd == "remove-images":
            gone = store.remove_images(proj["id"], args.images)
            print(f"removed {len(gone)} image{'s' if len(gone) != 1 else ''} from {proj['name']!r} with their "
                  "annotations (the files stay): " + ", ".join(im["file_name"] for im in gone))
        elif cmd == "export":
            print(exports.export_summary(store, proj["id"], args.format, args.out, force=args.force).describe())
        elif cmd == "import-coco":
            r = exports.import_coco_summary(store, proj["id"], args.coco_json, images_dir=args.images_dir,
                                            include_crowd=args.include_crowd,
                                            restore_deleted=args.restore_deleted)
            print(_import_line(r))
            if r.skipped:
                shown = ", ".join(repr(n) for n in r.missing_images[:3]) + (", ..." if len(r.missing_images) > 3
                                                                            else "")
                print(f"[segany] skipped {r.skipped} annotations on {len(r.missing_images)} images not found in "
                      f"{' or in '.join(r.looked_in)} ({shown}); "
                      + ("pass --images-dir FOLDER holding them" if args.images_dir is None
                         else "put them in --images-dir under the names the COCO file gives"), file=sys.stderr)
        elif cmd == "stats":
            anns = store.list_annotations(project_id=proj["id"])
            by_state: dict[str, int] = {}
            for a in anns:
                by_state[f"{a['source']}/{a['review_state']}"] = by_state.get(f"{a['source']}/{a['review_state']}", 0) + 1
            secs = [a["seconds_spent"] for a in anns if a["seconds_spent"] is not None and a["source"] == "manual"]
            print(f"project {proj['name']!r}: {len(store.list_images(proj['id']))} images, {len(anns)} annotations")
            for k, v in sorted(by_state.items()):
                print(f"  {k}: {v}")
            if secs:
                print(f"  seconds per manual mask: {sum(secs) / len(secs):.1f} (n={len(secs)})")
        return 0
    except BaseException:
        store.close()
        remove_paths(made)  # a project that could not be created leaves no empty store behind
        raise
    finally:
        store.close()


def _import_line(r: Any) -> str:
    """One line of counts for an import: what it did with each annotation of the file."""
    parts = [f"imported {r.created} annotations", f"updated {r.updated}", f"unchanged {r.unchanged}"]
    skipped = [f"{n} {what}" for n, what in ((r.empty, "empty masks"), (r.crowd, "crowd regions (--include-crowd "
                                             "imports them)"), (r.skipped, "on missing images")) if n]
    line = ", ".join(parts) + f", skipped {r.empty + r.crowd + r.skipped}" + (f" ({', '.join(skipped)})" if skipped
                                                                             else "")
    if r.duplicate:
        line += (f"; {r.duplicate} not added: the same mask and label are already on their image (a mask the file "
                 "holds twice, or annotations exported from a project and imported back)")
    if r.unknown_category:
        line += f"; {r.unknown_category} with a category_id not in the file's categories were labelled 'object'"
    if r.no_longer_in_file:
        line += (f"; {r.no_longer_in_file} annotations an earlier import of this file created are no longer in it "
                 "(kept; delete them in the app if they should go)")
    if r.kept_deleted:
        line += (f"; {r.kept_deleted} annotations deleted in the project since an earlier import were left deleted "
                 "(--restore-deleted brings them back)")
    if r.labels_added:
        line += f"; added labels {', '.join(r.labels_added)}"
    return line + (f"; added {r.images_added} images" if r.images_added else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="segany project")
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
