"""Training recipes for AffectNet: every knob of a full run in one file (docs/RECIPES.md)."""
