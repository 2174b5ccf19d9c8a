"""Where a run's initial weights come from: random init, the weights shipped with segany, or a file.

``model.checkpoint: null`` silently meant random init, which is right for training from scratch and a trap
for fine-tuning (first loss 3.4 instead of 0.7). ``bundled`` names the shipped weights without a path, and
the run prints its source (file and sha256 prefix) so a log always says what it started from.
"""

from __future__ import annotations

from pathlib import Path

from segany.train.config import BUNDLED, ModelSection


def resolve_init_checkpoint(model: ModelSection) -> Path | None:
    """The file ``model.checkpoint`` means (None = random init); ``bundled`` finds the shipped weights."""
    if model.checkpoint is None:
        return None
    if model.checkpoint != BUNDLED:
        return Path(model.checkpoint)  # read and checked by build_sam / load_weights, as before
    from segany.checkpoints import bundled_weights

    return bundled_weights(model.name)


def describe_init(path: Path | None, bundled: bool, sha: str | None = None) -> str:
    """One line for the start-up banner: ``random init`` or the file and its sha256 prefix (``sha``: the digest
    already taken, e.g. the run's recorded one, so the file is not hashed again)."""
    if path is None:
        return "random init (model.checkpoint is null)"
    if sha is None:
        from segany.hashing import weights_digest

        sha = weights_digest(path)
    return f"{'bundled ' if bundled else ''}{path} (sha256 {sha[:12]})"
