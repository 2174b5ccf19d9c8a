"""An import racing an image's removal on PostgreSQL (READ COMMITTED): the removal commits while the import
runs. The import read the image from its snapshot and met the committed delete at its annotation insert as a
raw ForeignKeyViolation; now it waits for the removal on the image row and refuses the record by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_store_postgres import (  # noqa: F401  (the fixtures: PostgreSQL, a database, two clients of it)
    _images,
    _name,
    _race,
    postgres_url,
    races_url,
    two_stores,
)

from segany.engine.db import Image
from segany.engine.masks import encode_mask
from segany.engine.store import Store, StoreError

pytestmark = pytest.mark.postgres


def test_an_import_racing_a_removal_refuses_the_record_by_name(two_stores: tuple[Store, Store],  # noqa: F811
                                                                tmp_path: Path) -> None:
    a, b = two_stores
    pid = a.create_project(_name("p"), labels=["thing"])["id"]
    im = a.add_images(pid, _images(tmp_path / "im", 1))[0]
    m = np.zeros((im["height"], im["width"]), bool)
    m[2:9, 3:7] = True
    record = {"image_sha256": im["sha256"], "key": "00000000-0000-4000-8000-000000000001", "rle": encode_mask(m),
              "label": "thing", "source": "manual", "prompts": {}, "seconds_spent": None, "predicted_iou": None}

    def remove(s) -> None:  # what remove_images does, not committed yet
        s.delete(s.get(Image, im["id"]))

    with pytest.raises(StoreError, match="is not in the project .removed while importing.*rerun the import"):
        _race(a, remove, lambda: b.import_annotations(pid, new_images=[], labels=["thing"], records=[record]))
    assert a.list_images(pid) == []
