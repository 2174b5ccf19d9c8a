"""Versions of the data engine's two moving parts: model weights and frozen dataset versions.

* :func:`model_version_name` is the one name a set of weights gets in ``model_versions``, whoever registers
  it (``segany serve``, ``segany engine auto``, ``engine retrain``): the model type plus the sha256 of the
  weights' content. One name means one row, so masks drawn in the app keep the lineage (parent, dataset
  version) that retraining recorded on that row.
* A dataset version's content is its immutable snapshot (``dataset_version_items``, migration 0005);
  :func:`snapshot_items` reads it, :func:`list_versions` lists a project's versions and
  :func:`export_version_coco` writes one as COCO (RLE segmentations), for training elsewhere.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from segany.errors import InputError

# (resolved path, size, mtime_ns) -> sha256: the server and the engine hash a multi-GB checkpoint once per process.
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a weights file's content (cached per process while the file is unchanged)."""
    from segany.engine.store import file_sha256

    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(p)
    return _SHA_CACHE[key]


def model_version_name(model_type: str, checkpoint: str | os.PathLike[str] | None = None, *,
                       checkpoint_bytes: bytes | None = None) -> str:
    """``<model type>:<first 16 hex of the weights' sha256>`` (``:random-init`` without weights).

    Named by content, not by path: the same weights copied elsewhere are the same model version.
    """
    if checkpoint_bytes is not None:
        return f"{model_type}:{hashlib.sha256(checkpoint_bytes).hexdigest()[:16]}"
    if checkpoint:
        return f"{model_type}:{weights_sha256(checkpoint)[:16]}"
    return f"{model_type}:random-init"


# ------------------------------------------------------------------------------------ dataset versions
def _find_version(s: Any, project_id: int, version: str | int) -> Any:
    from sqlalchemy import select

    from segany.engine.db import DatasetVersion

    rows = list(s.scalars(select(DatasetVersion).where(DatasetVersion.project_id == project_id)
                          .order_by(DatasetVersion.id)))
    for dv in rows:
        if str(version) in (dv.name, str(dv.id)) or dv.name.split("-")[0] == str(version):
            return dv
    names = ", ".join(dv.name for dv in rows) or "none yet (run segany engine retrain)"
    raise InputError(f"no dataset version {version!r} in this project; pass one of: {names}")


def snapshot_items(store: Any, dataset_version_id: int) -> list[dict[str, Any]]:
    """The masks frozen in a dataset version, grouped by image, images in the order the snapshot holds them,
    each image's masks by annotation uuid.

    The order comes only from what the snapshot stores (its row ids, the images' sha256, the uuids), so an
    export of the version numbers its images and masks the same way after images are removed from the
    project: the snapshot's ``image_id`` becomes NULL then, and ordering by it moved those images first.
    Freezing writes the rows in image-id order, so a version exports in the image-id order it was frozen
    with (a version frozen before that, with its rows in uuid order, numbers its images in that order). A
    version made without a snapshot falls back to its links to live annotations (image id order), which is
    all it has.
    """
    from sqlalchemy import select

    from segany.engine.db import (
        Annotation,
        DatasetVersion,
        DatasetVersionItem,
        Image,
        dataset_version_annotations,
    )

    with store.transaction(write=False) as s:
        if s.get(DatasetVersion, dataset_version_id) is None:
            raise InputError(f"no dataset version with id {dataset_version_id}")
        items = list(s.scalars(select(DatasetVersionItem)
                               .where(DatasetVersionItem.dataset_version_id == dataset_version_id)))
        if items:
            first_row: dict[str, int] = {}  # image sha256 -> the snapshot's first row of that image
            for it in sorted(items, key=lambda it: it.id):
                first_row.setdefault(it.image_sha256, it.id)
            return [_item_dict(it) for it in sorted(items, key=lambda it: (first_row[it.image_sha256],
                                                                              it.annotation_uuid))]
        q = (select(Annotation, Image).join(Image, Image.id == Annotation.image_id)
             .join(dataset_version_annotations, dataset_version_annotations.c.annotation_id == Annotation.id)
             .where(dataset_version_annotations.c.dataset_version_id == dataset_version_id))
        out = [{"annotation_uuid": a.uuid, "image_id": im.id, "image_sha256": im.sha256, "image_path": im.path,
                "file_name": im.file_name, "label": a.label, "source": a.source, "rle_counts": a.rle_counts,
                "height": a.height, "width": a.width, "area": a.area, "bbox_xywh": list(a.bbox_xywh or [])}
               for a, im in s.execute(q)]
    return sorted(out, key=lambda d: (d["image_id"], d["annotation_uuid"]))


def _item_dict(it: Any) -> dict[str, Any]:
    return {"annotation_uuid": it.annotation_uuid, "image_id": it.image_id, "image_sha256": it.image_sha256,
            "image_path": it.image_path, "file_name": it.file_name, "label": it.label, "source": it.source,
            "rle_counts": it.rle_counts, "height": it.height, "width": it.width, "area": it.area,
            "bbox_xywh": list(it.bbox_xywh or [])}


def list_versions(store: Any, project: str | None) -> list[dict[str, Any]]:
    """The project's dataset versions, oldest first, with the model versions trained on each.

    ``near_duplicate_groups`` counts the groups of near-duplicate images with an image in the version (see
    :func:`segany.engine.retrain.split_images`), ``near_duplicate_groups_split`` those of them with images on
    both sides (earlier versions put them there, before groups were kept together or before a new image linked
    them) and ``near_duplicate_left_out`` the version's images of such groups that are on neither side; all are 0
    for a version frozen before groups were kept.
    """
    from sqlalchemy import func, select

    from segany.engine.db import DatasetVersion, DatasetVersionItem, ModelVersion

    proj = store.get_project(project)
    with store.transaction(write=False) as s:
        out = []
        for dv in s.scalars(select(DatasetVersion).where(DatasetVersion.project_id == proj["id"])
                            .order_by(DatasetVersion.id)):
            n = s.scalar(select(func.count()).where(DatasetVersionItem.dataset_version_id == dv.id))
            models = list(s.scalars(select(ModelVersion.name).where(ModelVersion.trained_on_id == dv.id)))
            m = dv.meta or {}
            out.append({"id": dv.id, "name": dv.name, "created_at": dv.created_at.isoformat(timespec="seconds"),
                        "masks": int(n or 0), "images": m.get("images"), "content_hash": m.get("content_hash"),
                        "held_out_images": len(m.get("held_out_image_ids", [])),
                        "near_duplicate_groups": int(m.get("near_duplicate_groups", 0)),
                        "near_duplicate_groups_split": int(m.get("near_duplicate_groups_split", 0)),
                        "near_duplicate_left_out": len(m.get("near_duplicate_left_out_image_ids", [])),
                        "models": models})
    return out


VERSION_EXPORT_FORMAT = "segany-dataset-version-coco"
# The info description's fixed start: a later export recognises its own earlier file by the head alone.
VERSION_EXPORT_DESCRIPTION = "segany dataset version "


def export_version_coco(store: Any, project: str | None, version: str | int, out_path: str | os.PathLike[str]
                        ) -> dict[str, Any]:
    """Write a dataset version's snapshot as a COCO instances file (RLE segmentations); returns counts."""
    from segany.atomic import atomic_write_json

    out = Path(out_path)
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: folder {out.parent} does not exist; create it or pick another path")
    if out.is_dir():
        raise InputError(f"{out} is a folder; pass a file path such as {out / 'coco.json'}")
    from segany.engine.exports import coco_file_names, is_segany_coco

    if out.exists() and not is_segany_coco(out, VERSION_EXPORT_DESCRIPTION):  # e.g. a file the project imported
        raise InputError(f"{out} exists and is not a segany dataset-version export; pass a new file name")
    proj = store.get_project(project)
    with store.transaction(write=False) as s:
        dv = _find_version(s, proj["id"], version)
        dv_id, dv_name, cat = dv.id, dv.name, dict((dv.meta or {}).get("category_ids") or {})
    items = snapshot_items(store, dv_id)
    # The ids frozen with the version (see retrain.category_ids); a version frozen before they were kept
    # numbers its own labels in sorted order, as its exports always did.
    for name in sorted({it["label"] for it in items} - set(cat)):
        cat[name] = max(cat.values(), default=0) + 1
    images: dict[str, dict[str, Any]] = {}
    annotations = []
    for it in items:
        im = images.setdefault(it["image_sha256"], {
            "id": len(images) + 1, "file_name": it["file_name"], "height": it["height"], "width": it["width"],
            "path": it["image_path"], "sha256": it["image_sha256"]})
        annotations.append({"id": len(annotations) + 1, "image_id": im["id"], "category_id": cat[it["label"]],
                            "segmentation": {"size": [it["height"], it["width"]], "counts": it["rle_counts"]},
                            "area": it["area"], "bbox": it["bbox_xywh"], "iscrowd": 0,
                            "segany_uuid": it["annotation_uuid"], "segany_source": it["source"]})
    unique = coco_file_names([{"id": im["id"], "file_name": im["file_name"], "path": im["path"]}
                              for im in images.values()])
    for im in images.values():  # two pictures named alike must not share a name an import would look up
        im["file_name"] = unique[im["id"]]
    coco = {"info": {"description": f"{VERSION_EXPORT_DESCRIPTION}{dv_name} of {proj['name']}",
                     "segany": {"format": VERSION_EXPORT_FORMAT}},
            "images": list(images.values()), "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in cat.items()]}
    atomic_write_json(out_path, coco)
    return {"name": dv_name, "images": len(images), "annotations": len(annotations), "path": str(out_path)}
