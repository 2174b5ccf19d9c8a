"""Who may do what on the annotation server: the three roles of the data engine.

SA-1B's engine had annotators who drew and fixed masks and reviewers who checked other people's work; the
roles here follow that split (``segany.engine.db.ROLES``):

* ``annotator`` (the default): saves masks, edits, reviews and deletes their own until someone else has
  reviewed it, and accepts or rejects machine proposals nobody owns yet (stage-2 pre-fills, stage-3
  automatic masks) — accepting one makes it theirs. Cannot touch another person's annotation, overturn a
  review of their own, or change the project.
* ``reviewer``: also accepts, rejects, edits and deletes anyone's annotation.
* ``admin``: also changes the project (stage, labels) and adds images to it.

Each check raises :class:`PermissionDeniedError` (HTTP 403) whose one-line message names the role needed.
"""

from __future__ import annotations

from typing import Any

from segany.engine.db import ROLES
from segany.errors import SeganyError

_RANK = {role: i for i, role in enumerate(ROLES)}  # each role can do everything the ones before it can


class PermissionDeniedError(SeganyError):
    """The signed-in user's role does not allow this request."""


def has_role(who: dict[str, Any], role: str) -> bool:
    """True when ``who`` (an authenticated user dict with ``role``) has ``role`` or a higher one."""
    return _RANK.get(str(who.get("role")), -1) >= _RANK[role]


def require_role(who: dict[str, Any], role: str, action: str) -> None:
    """Refuse ``action`` (e.g. "changing the project") unless ``who`` has ``role`` or a higher one."""
    if not has_role(who, role):
        needed = "the admin role" if role == "admin" else f"the {role} or admin role"
        raise PermissionDeniedError(f"{action} needs {needed}; you ({who.get('name')}) are {who.get('role')} "
                                    f"(an admin can run `segany project set-role DIR {who.get('name')} {role}`)")


def is_open_proposal(ann: dict[str, Any]) -> bool:
    """A machine proposal nobody has taken yet: pending, with no annotator."""
    return ann.get("annotator_id") is None and ann.get("review_state") == "pending"


def reviewed_by_other(who: dict[str, Any], ann: dict[str, Any]) -> bool:
    """Someone other than ``who`` has reviewed ``ann``: its annotator may no longer overturn that review."""
    return ann.get("reviewer_id") not in (None, who.get("id"))


def can_review(who: dict[str, Any], ann: dict[str, Any]) -> bool:
    """May ``who`` accept, reject or edit ``ann``: their own (until another person reviewed it), an open
    proposal, or anyone's for a reviewer."""
    if has_role(who, "reviewer"):
        return True
    return (ann.get("annotator_id") == who.get("id") and not reviewed_by_other(who, ann)) or is_open_proposal(ann)


def can_delete(who: dict[str, Any], ann: dict[str, Any]) -> bool:
    """May ``who`` delete ``ann``: their own (until another person reviewed it), or anyone's for a reviewer (an
    annotator rejects a proposal instead, so the model's mistake stays in the store for retraining)."""
    return has_role(who, "reviewer") or (ann.get("annotator_id") == who.get("id")
                                         and not reviewed_by_other(who, ann))


def _whose(who: dict[str, Any], ann: dict[str, Any], *, deleting: bool = False) -> str:
    """What ``ann`` is to ``who``, for the refusal message. Only an open proposal may be rejected instead of
    deleted; an annotation nobody owns that is not pending (imported, or a proposal already reviewed) is a
    reviewer's to change, so the message must not send the annotator to a reject they would also be refused."""
    if is_open_proposal(ann):
        return "a machine proposal" + (" (reject it instead)" if deleting else "")
    if ann.get("annotator_id") is None:
        return "an annotation nobody owns (imported, or a machine proposal already reviewed)"
    if ann.get("annotator_id") == who.get("id"):
        return "your annotation after another person's review"
    return "another person's annotation"


def require_review(who: dict[str, Any], ann: dict[str, Any], action: str) -> None:
    if not can_review(who, ann):
        require_role(who, "reviewer", f"{action} {_whose(who, ann)} ({ann.get('id')})")


def require_delete(who: dict[str, Any], ann: dict[str, Any]) -> None:
    if not can_delete(who, ann):
        require_role(who, "reviewer", f"deleting {_whose(who, ann, deleting=True)} ({ann.get('id')})")
