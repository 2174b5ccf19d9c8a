"""Data engine (SAM §4): the annotation store, its exports, and the stages that fill it."""
