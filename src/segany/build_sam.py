"""``segment_anything.build_sam`` path: the builders live in :mod:`segany.compat` and :mod:`segany.checkpoints`.

As in the reference package, the top-level name ``segany.build_sam`` stays the builder *function*
(``from segany import build_sam``) even after this module is imported; reach the module's names with
``from segany.build_sam import sam_model_registry``. Unlike the reference's ``build_sam`` (an alias of
``build_sam_vit_h(checkpoint)``), segany's takes the model name first: ``build_sam("vit_b", checkpoint=...)``;
``build_sam(checkpoint=path)`` builds ViT-H in both, and ``build_sam(path)`` loads that file in both.
"""

from segany.checkpoints import build_sam
from segany.compat import (
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    build_sam_vit_t,
    sam_model_registry,
)

__all__ = ["build_sam", "build_sam_vit_b", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_t",
           "sam_model_registry"]
