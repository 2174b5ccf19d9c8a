"""Evaluation: the interactive click protocol, box prompts, AR for automatic masks, GrabCut baseline."""
