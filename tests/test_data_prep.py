"""data_prep.affectnet on the official layout: every bad case, every odd image
format, landmarks, encodings, the 7-class protocol, and tfds read-back."""
import builtins
import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from affectjax import data as affect_data
from data_prep import affectnet
from data_prep import synthetic

RED, BLUE = (200, 30, 30), (30, 30, 200)
S = 32  # Output image size used throughout.


def _two_tone(w=64, h=48) -> Image.Image:
  """Top half red, bottom half blue: orientation and colour are checkable."""
  a = np.zeros((h, w, 3), np.uint8)
  a[:h // 2] = RED
  a[h // 2:] = BLUE
  return Image.fromarray(a)


def _jpeg(im: Image.Image, **kw) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format="JPEG", quality=95, **kw)
  return buf.getvalue()


def _png(im: Image.Image) -> bytes:
  buf = io.BytesIO()
  im.save(buf, format="PNG")
  return buf.getvalue()


def _odd_formats() -> dict[str, tuple[bytes, tuple, tuple]]:
  """name -> (file bytes, expected top colour, expected bottom colour)."""
  tt = _two_tone()
  gray = Image.fromarray(np.where(np.arange(48)[:, None] < 24, 200, 50)
                         .astype(np.uint8).repeat(64, 1))
  g16 = np.where(np.arange(48)[:, None] < 24, 200 * 257, 50 * 257).astype(
      np.uint16).repeat(64, 1)
  rgba = tt.convert("RGBA")
  # EXIF orientation 6 = "rotate 90 deg clockwise to display": store the
  # upright picture rotated counter-clockwise.
  exif = Image.Exif()
  exif[0x0112] = 6
  rotated = _jpeg(tt.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
  return {
      "gray.jpg": (_jpeg(gray), (200,) * 3, (50,) * 3),
      "cmyk.jpg": (_jpeg(tt.convert("CMYK")), RED, BLUE),
      "palette.png": (_png(tt.convert("P")), RED, BLUE),
      "rgba.png": (_png(rgba), RED, BLUE),
      "gray16.png": (_png(Image.fromarray(g16)), (200,) * 3, (50,) * 3),
      "png_named.jpg": (_png(tt), RED, BLUE),
      "exif_rotated.jpg": (rotated, RED, BLUE),
      "upper.JPG": (_jpeg(tt), RED, BLUE),
  }


def _add_row(lines, path, box=(0, 0, 64, 48), lm="", expr=1, v=0.5, a=0.1):
  x, y, w, h = box
  lines.append(f"{path},{x},{y},{w},{h},{lm},{expr},{v},{a}".encode())


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
  """A synthetic official tree plus one row for every bad and odd case.

  Returns (root, expected skip counts for train, {path: expected colours},
  set of paths that must never be opened).
  """
  root = str(tmp_path_factory.mktemp("official"))
  synthetic.generate(root, num_train=24, num_val=8, seed=2, image_size=72)
  img_root = os.path.join(root, synthetic.IMAGES_DIR)
  odd_dir = os.path.join(img_root, "odd")
  os.makedirs(odd_dir)
  lines = []
  colours = {}
  for name, (data, top, bottom) in _odd_formats().items():
    with open(os.path.join(odd_dir, name), "wb") as fp:
      fp.write(data)
    # The box is in displayed (EXIF-upright) pixels: 64 x 48 for all.
    _add_row(lines, f"odd/{name}", box=(0, 0, 64, 48))
    colours[f"odd/{name}"] = (top, bottom)
  # The CSV says .jpg, the file on disk is .JPG (as in real AffectNet).
  with open(os.path.join(odd_dir, "case.JPG"), "wb") as fp:
    fp.write(_jpeg(_two_tone()))
  _add_row(lines, "odd/case.jpg")
  colours["odd/case.jpg"] = (RED, BLUE)

  good = _jpeg(_two_tone())
  with open(os.path.join(odd_dir, "empty.jpg"), "wb"):
    pass
  with open(os.path.join(odd_dir, "truncated.jpg"), "wb") as fp:
    fp.write(good[:len(good) // 2])
  with open(os.path.join(odd_dir, "garbage.jpg"), "wb") as fp:
    fp.write(os.urandom(500))
  secret = os.path.join(root, "secret.jpg")  # Outside the image root.
  with open(secret, "wb") as fp:
    fp.write(good)
  os.symlink(secret, os.path.join(odd_dir, "link_out.jpg"))
  never_open = {os.path.realpath(secret), "/etc/passwd"}

  expected = {
      "missing_file": 1, "empty_file": 1, "corrupt_image": 2,
      "malformed_row": 5, "label_out_of_range": 3, "label_none": 1,
      "label_uncertain": 1, "label_no_face": 1, "path_escapes_root": 3,
      "symlink_outside_root": 1, "bad_face_box": 2,
  }
  _add_row(lines, "odd/does_not_exist.jpg")
  _add_row(lines, "odd/empty.jpg")
  _add_row(lines, "odd/truncated.jpg")
  _add_row(lines, "odd/garbage.jpg")
  lines.append(b"odd/few_fields.jpg,1,2,3")  # Malformed rows ...
  _add_row(lines, "odd/x.jpg", expr="happy")
  _add_row(lines, "odd/x.jpg", lm="1;2;3")
  lines.append(b"\xff\xfe\x00odd/bad_utf8.jpg,0,0,64,48,,1,0,0")
  _add_row(lines, "odd/x.jpg", v="nan?")
  _add_row(lines, "odd/upper.JPG", expr=12)  # Label out of range ...
  _add_row(lines, "odd/upper.JPG", v=1.5)
  _add_row(lines, "odd/upper.JPG", a=-3)
  _add_row(lines, "odd/upper.JPG", expr=8)
  _add_row(lines, "odd/upper.JPG", expr=9)
  _add_row(lines, "odd/upper.JPG", expr=10)
  _add_row(lines, "../secret.jpg")  # Escapes ...
  _add_row(lines, "/etc/passwd")
  _add_row(lines, "odd/../../secret.jpg")
  _add_row(lines, "odd/link_out.jpg")  # A symlink in the tree, to outside.
  _add_row(lines, "odd/upper.JPG", box=(0, 0, 0, 48))  # Bad boxes ...
  _add_row(lines, "odd/upper.JPG", box=(500, 500, 20, 20))
  # -2 ("no value") is valid and kept as -2.
  _add_row(lines, "odd/upper.JPG", v=-2, a=-2)
  lines.append(b"")  # A blank line is not a row.
  with open(os.path.join(root, "training.csv"), "ab") as fp:
    fp.write(b"\n".join(lines) + b"\n")
  return root, expected, colours, never_open


@pytest.fixture(scope="module")
def prepared(bad_tree, tmp_path_factory):
  root, _, _, never_open = bad_tree
  out = str(tmp_path_factory.mktemp("out"))
  opened = []
  real_open = builtins.open

  def spy(file, *args, **kw):
    if isinstance(file, (str, os.PathLike)):
      opened.append(os.path.realpath(file))
    return real_open(file, *args, **kw)

  builtins.open = spy
  try:
    manifest = affectnet.prepare(root, out, image_size=S, num_shards=2,
                                 progress=False)
  finally:
    builtins.open = real_open
  return out, manifest, opened


def test_bad_rows_are_counted_by_reason(bad_tree, prepared):
  root, expected, colours, _ = bad_tree
  _, manifest, _ = prepared
  train = manifest["splits"]["train"]
  assert train["skipped"] == expected
  # 24 synthetic + 9 odd formats + the -2 row are written.
  assert train["written"] == 24 + len(colours) + 1
  assert train["rows"] == train["written"] + sum(expected.values())
  assert manifest["splits"]["val"] == {**manifest["splits"]["val"],
                                       "written": 8, "skipped": {}}
  # Examples name the file and the CSV line number.
  with open(os.path.join(root, "training.csv"), "rb") as fp:
    lines = fp.read().split(b"\n")
  for reason, examples in train["skip_examples"].items():
    assert 1 <= len(examples) <= 5
    for ex in examples:
      line = lines[ex["row"] - 1].decode("utf-8", "replace")
      assert ex["path"] in line, (reason, ex, line)
  assert train["skip_examples"]["missing_file"][0]["path"] == (
      "odd/does_not_exist.jpg")


def test_escaping_paths_are_never_opened(bad_tree, prepared):
  never_open = bad_tree[3]
  opened = prepared[2]
  assert opened, "the spy saw no file opens at all"
  assert not never_open & set(opened)
  train = prepared[1]["splits"]["train"]
  (link,) = train["skip_examples"]["symlink_outside_root"]
  assert link["path"] == "odd/link_out.jpg"
  assert "--follow_symlinks" in link["detail"]


def test_follow_symlinks_reads_links_but_not_escaping_rows(bad_tree, tmp_path):
  """--follow_symlinks reads the user's symlink; rows with '..' or an
  absolute path are still refused."""
  root, expected, _, _ = bad_tree
  m = affectnet.prepare(root, str(tmp_path), image_size=S, num_shards=1,
                        follow_symlinks=True, progress=False)
  train = m["splits"]["train"]
  assert train["skipped"]["path_escapes_root"] == 3
  assert "symlink_outside_root" not in train["skipped"]
  assert m["options"]["follow_symlinks"] is True
  src = affect_data.source(str(tmp_path), "train")
  paths = [src[i]["path"] for i in range(len(src))]
  assert "odd/link_out.jpg" in paths
  assert not {"../secret.jpg", "/etc/passwd", "odd/../../secret.jpg"} & set(
      paths)


def test_odd_formats_come_out_as_upright_rgb(bad_tree, prepared):
  colours = bad_tree[2]
  out = prepared[0]
  src = affect_data.source(out, "train")
  found = {}
  for i in range(len(src)):
    ex = src[i]
    if ex["path"] in colours:
      found[ex["path"]] = ex["image"]
  assert set(found) == set(colours)
  for path, img in found.items():
    top, bottom = colours[path]
    assert img.shape == (S, S, 3)
    np.testing.assert_allclose(img[3, S // 2], top, atol=40, err_msg=path)
    np.testing.assert_allclose(img[S - 4, S // 2], bottom, atol=40,
                               err_msg=path)


def test_no_value_is_kept_as_minus_two(prepared):
  src = affect_data.source(prepared[0], "train")
  vals = [(src[i]["valence"], src[i]["arousal"]) for i in range(len(src))]
  assert (np.float32(-2.0), np.float32(-2.0)) in vals
  assert all(v == -2.0 or -1 <= v <= 1 for pair in vals for v in pair)


def test_manifest_fields_and_checksums(prepared):
  import hashlib
  out, manifest, _ = prepared
  with open(os.path.join(out, "manifest.json")) as fp:
    assert json.load(fp) == manifest
  assert manifest["num_classes"] == 8
  assert manifest["label_names"] == list(affect_data.LABEL_NAMES_8)
  assert manifest["layout"] == "official"
  assert manifest["image_size"] == S and manifest["encoding"] == "jpeg"
  assert manifest["tool_version"] == affectnet.TOOL_VERSION
  assert manifest["options"]["margin"] == 0.1
  for split in ("train", "val"):
    info = manifest["splits"][split]
    assert sum(info["class_counts"]) == info["written"]
    assert sum(s["num_examples"] for s in info["shards"]) == info["written"]
    for shard in info["shards"]:
      with open(os.path.join(out, shard["file"]), "rb") as fp:
        assert hashlib.sha256(fp.read()).hexdigest() == shard["sha256"]
  # No temp files are left behind.
  assert not [n for n in os.listdir(out) if ".tmp" in n]


def test_landmarks_move_into_crop_coordinates(tmp_path):
  root = tmp_path / "in"
  (root / "Manually_Annotated_Images" / "1").mkdir(parents=True)
  Image.new("RGB", (100, 100), (90, 90, 90)).save(
      root / "Manually_Annotated_Images" / "1" / "a.jpg")
  lm = np.tile([40.0, 40.0], (68, 1))
  lm[0] = (20, 60)  # The crop's bottom-left corner.
  lm_text = ";".join(f"{v:g}" for v in lm.reshape(-1))
  header = ",".join(
      ["subDirectory_filePath", "face_x", "face_y", "face_width",
       "face_height", "facial_landmarks", "expression", "valence", "arousal"])
  (root / "training.csv").write_text(
      f"{header}\n1/a.jpg,20,20,40,40,{lm_text},3,0.1,0.2\n")
  # validation.csv without a header line: it is optional.
  (root / "validation.csv").write_text("1/a.jpg,20,20,40,40,,0,0,0\n")
  out = tmp_path / "out"
  m = affectnet.prepare(str(root), str(out), image_size=S, margin=0.0,
                        progress=False)
  assert m["splits"]["val"]["written"] == 1
  # The face crop (40 px of a 100 px photo), not the photo, is what is
  # upscaled: 40 >= 32 is not; at 48 px both faces are, and counted.
  assert (m["splits"]["train"]["upscaled"],
          m["splits"]["train"]["min_source_side"]) == (0, 40)
  big = affectnet.prepare(str(root), str(tmp_path / "big"), image_size=48,
                          margin=0.0, progress=False)
  assert [(big["splits"][s]["upscaled"], big["splits"][s]["min_source_side"])
          for s in ("train", "val")] == [(1, 40), (1, 40)]
  ex = affect_data.source(str(out), "train")[0]
  np.testing.assert_allclose(ex["landmarks"][1:], np.full((67, 2), S / 2))
  np.testing.assert_allclose(ex["landmarks"][0], [0, S])
  assert np.isnan(affect_data.source(str(out), "val")[0]["landmarks"]).all()


def test_raw_encoding_matches_jpeg(bad_tree, prepared, tmp_path):
  root = bad_tree[0]
  m = affectnet.prepare(root, str(tmp_path), image_size=S, encoding="raw",
                        num_shards=1, progress=False)
  assert m["encoding"] == "raw"
  raw_src = affect_data.source(str(tmp_path), "val")
  jpg_src = affect_data.source(prepared[0], "val")
  assert len(raw_src) == len(jpg_src) == 8
  for i in range(8):
    a, b = raw_src[i], jpg_src[i]
    assert a["path"] == b["path"]
    # JPEG at quality 90 on these noisy faces costs a few levels per pixel.
    assert np.abs(a["image"].astype(int) - b["image"]).mean() < 8
  # Raw pixels are exactly the crop + resize (lossless PNG source, full box).
  train = affect_data.source(str(tmp_path), "train")
  png = [train[i] for i in range(len(train))
         if train[i]["path"] == "odd/png_named.jpg"][0]
  want = np.asarray(_two_tone().resize((S, S), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(png["image"], want)
  # tfds reads raw shards too (a bytes-encoded uint8 Tensor feature).
  import tensorflow_datasets as tfds
  theirs = tfds.builder_from_directory(str(tmp_path)).as_data_source("val")
  for i in range(8):
    np.testing.assert_array_equal(theirs[i]["image"], raw_src[i]["image"])


def test_seven_class_protocol(bad_tree, tmp_path):
  root = bad_tree[0]
  m = affectnet.prepare(root, str(tmp_path), image_size=S, classes=7,
                        progress=False)
  with open(os.path.join(root, "training.csv"), errors="replace") as fp:
    contempt = sum(1 for r in csv.reader(fp) if len(r) == 9 and r[6] == "7")
  assert contempt > 0
  assert m["num_classes"] == 7 and len(m["label_names"]) == 7
  assert "contempt" not in m["label_names"]
  assert m["splits"]["train"]["skipped"]["excluded_class"] == contempt
  assert len(m["splits"]["train"]["class_counts"]) == 7
  src = affect_data.source(str(tmp_path), "train")
  assert max(src[i]["expression"] for i in range(len(src))) <= 6
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(str(tmp_path))
  assert builder.info.features["expression"].num_classes == 7


def test_tfds_reads_the_same_records(prepared):
  import tensorflow_datasets as tfds
  out, manifest, _ = prepared
  builder = tfds.builder_from_directory(out)
  assert builder.info.splits["train"].num_examples == (
      manifest["splits"]["train"]["written"])
  assert builder.info.features["expression"].names == list(
      affect_data.LABEL_NAMES_8)
  for split in ("train", "val"):
    ours = affect_data.source(out, split)
    theirs = builder.as_data_source(split)
    assert len(theirs) == len(ours)
    for i in range(0, len(ours), 3):
      a, b = ours[i], theirs[i]
      np.testing.assert_array_equal(a["image"], b["image"])
      assert a["expression"] == b["expression"]
      assert a["valence"] == np.float32(b["valence"])
      assert a["arousal"] == np.float32(b["arousal"])
      np.testing.assert_array_equal(a["landmarks"], b["landmarks"])
      assert a["path"] == b["path"].decode()


def test_bad_flags_are_rejected_with_clear_errors(bad_tree, tmp_path):
  root = bad_tree[0]
  with pytest.raises(ValueError, match="--encoding"):
    affectnet.prepare(root, str(tmp_path), encoding="png", progress=False)
  with pytest.raises(ValueError, match="--classes"):
    affectnet.prepare(root, str(tmp_path), classes=6, progress=False)
  with pytest.raises(ValueError, match="Cannot detect"):
    affectnet.prepare(str(tmp_path), str(tmp_path / "o"), progress=False)


def test_official_variant_folders_and_crlf(tmp_path):
  """CSVs in Manually_Annotated_file_lists/, images one level deeper, CRLF."""
  src = tmp_path / "flat"
  synthetic.generate(str(src), num_train=6, num_val=2, seed=4, image_size=64)
  root = tmp_path / "nested"
  (root / "Manually_Annotated").mkdir(parents=True)
  (root / "Manually_Annotated_file_lists").mkdir()
  os.rename(src / synthetic.IMAGES_DIR,
            root / "Manually_Annotated" / synthetic.IMAGES_DIR)
  for name in ("training.csv", "validation.csv"):
    text = (src / name).read_bytes().replace(b"\n", b"\r\n")
    (root / "Manually_Annotated_file_lists" / name).write_bytes(text)
  m = affectnet.prepare(str(root), str(tmp_path / "out"), image_size=S,
                        progress=False)
  assert m["layout"] == "official"
  assert (m["splits"]["train"]["written"], m["splits"]["val"]["written"]) == (
      6, 2)
  assert m["splits"]["train"]["skipped"] == {}
