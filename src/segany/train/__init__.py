"""Training with the SAM interactive recipe (SAM paper §3 "Training", appendix A)."""
