"""Label rules shared by every layout: which codes are kept, which skipped, why.

* Expression codes 0-7 are kept (0-6 with `--classes=7`, which drops
  Contempt; the remaining ids are unchanged, so a 7-class model's ids are
  AffectNet's).
* 8 (None), 9 (Uncertain), 10 (No-Face) are skipped, each under its own
  reason; with `--classes=7`, Contempt rows are skipped as `excluded_class`.
* The public sets (FER2013, FERPlus, RAF-DB; see `public_sets`, `rafdb`) map
  their own label order to these codes by class name: the numbering maps below
  (`FER2013_MAPPING`, `FERPLUS_MAPPING`, `RAFDB_MAPPING`), which numbered
  class folders (`--folder_numbers`) use too.
* Valence/arousal: -2 means "no value" and is kept as -2 (the loss masks it).
  Anything else outside [-1, 1] (or NaN) makes the row invalid.
"""
from __future__ import annotations

import math

from affectjax import data as affect_data

# Skip-reason keys (the manifest uses exactly these strings).
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
CORRUPT_IMAGE = "corrupt_image"
MALFORMED_ROW = "malformed_row"
LABEL_OUT_OF_RANGE = "label_out_of_range"
PATH_ESCAPES_ROOT = "path_escapes_root"  # The row's own path leaves the root.
# A symlink in the user's tree points outside the root (--follow_symlinks).
SYMLINK_OUTSIDE_ROOT = "symlink_outside_root"
MISSING_ANNOTATION = "missing_annotation"
NOT_AN_IMAGE = "not_an_image"
BAD_FACE_BOX = "bad_face_box"
EXCLUDED_CLASS = "excluded_class"
# A row whose split column (FER2013's Usage) or name (RAF-DB's train_/test_)
# names no known split; counted in train rather than dropped silently.
UNKNOWN_SPLIT = "unknown_split"
# FERPlus: a row with an empty `Image name` (a face FERPlus removed), and the
# majority-vote rule's drops (top vote not-a-face, unknown, or tied).
DROPPED_BY_FERPLUS = "dropped_by_ferplus"
VOTE_NOT_A_FACE = "vote_not_a_face"
VOTE_UNKNOWN = "vote_unknown"
VOTE_TIED = "vote_tied"
NON_EXPRESSION = {code: f"label_{name}"
                  for code, name in affect_data.NON_EXPRESSION_CODES.items()}

# Folder names accepted by the `folders` layout (lower-cased), besides the
# codes themselves. Includes the adjective forms hand-made trees often use.
FOLDER_ALIASES = {
    "neutral": 0, "happy": 1, "happiness": 1, "sad": 2, "sadness": 2,
    "surprise": 3, "surprised": 3, "fear": 4, "fearful": 4, "disgust": 5,
    "disgusted": 5, "anger": 6, "angry": 6, "contempt": 7,
}


def check(expression: int, valence: float, arousal: float,
          num_classes: int) -> str | None:
  """Returns the skip reason for a row's labels, or None if the row is kept."""
  if expression in NON_EXPRESSION:
    return NON_EXPRESSION[expression]
  if not 0 <= expression <= 7:
    return LABEL_OUT_OF_RANGE
  if expression >= num_classes:
    return EXCLUDED_CLASS
  for v in (valence, arousal):
    if math.isnan(v) or (v != affect_data.NO_VALUE and not -1.0 <= v <= 1.0):
      return LABEL_OUT_OF_RANGE
  return None


def parse_int(text: str) -> int:
  """'3', ' 3 ', '3.0' -> 3; anything else raises ValueError."""
  f = float(str(text).strip())
  if not f.is_integer():
    raise ValueError(f"not an integer: {text!r}")
  return int(f)


def folder_class(name: str) -> int | None:
  """Class code for a `folders` layout directory name, or None if unknown."""
  key = name.strip().lower()
  if key.isdigit():
    return int(key)
  return FOLDER_ALIASES.get(key)


def class_id(name: str) -> int:
  """A dataset's class name -> affectjax's class id (e.g. 'angry' -> 6)."""
  code = folder_class(name)
  if code is None or not 0 <= code <= 7:
    raise ValueError(f"no affectjax class for label name {name!r}")
  return code


# The public sets' own label orders, by name.
FER2013_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise",
                  "neutral")
# FERPlus's vote columns: eight emotions, then `unknown` and `NF` (not a
# face), in fer2013new.csv's (and label.csv's) order.
FERPLUS_VOTES = ("neutral", "happiness", "surprise", "sadness", "anger",
                 "disgust", "fear", "contempt", "unknown", "NF")
FERPLUS_EMOTIONS = FERPLUS_VOTES[:8]
RAFDB_LABELS = {1: "surprise", 2: "fear", 3: "disgust", 4: "happy", 5: "sad",
                6: "anger", 7: "neutral"}
# Source label (as the file writes it) -> affectjax class id.
FER2013_MAPPING = {str(i): class_id(n) for i, n in enumerate(FER2013_LABELS)}
FERPLUS_MAPPING = {n: class_id(n) for n in FERPLUS_EMOTIONS}
RAFDB_MAPPING = {str(i): class_id(n) for i, n in RAFDB_LABELS.items()}
