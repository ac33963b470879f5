"""Videos in `affectjax.predict`: frames read back with OpenCV equal what was
encoded, per-frame predictions equal the photo path's, tracks keep their ids,
the timeline changes class where the video does, both smoothings, short
tracks marked, bad frames and bad files get rows that say why, the decoder's
end and the file's rotation are what count, rows are on disk as they come
(a killed run keeps them), and the CLI writes the table, tracks.csv, the
pictures and the annotated copy in real time (real OpenCV encode/decode,
the tiny trained run)."""
import csv
import io
import math
import os
import signal
import subprocess
import sys
import time

import cv2  # The `test` extra installs OpenCV (the `detect` extra's pin): no skip.
import numpy as np
import pytest
from PIL import Image

from affectjax import data
from affectjax import face_detect
from affectjax import predict
from affectjax import predict_table
from affectjax import tracks
from affectjax import video
from affectjax import video_pictures
from tests import use_fixtures
from tests import video_fixtures as vf

W, H, FPS = 96, 56, 10.0


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, synthetic_arrayrecord):
  return use_fixtures.trained_workdir(tmp_path_factory, synthetic_arrayrecord)


def _inner_box_detector(margin, tol=0):
  """Boxes whose crop (grown by ``margin``, as predict crops) is exactly the
  pasted face: the model then sees the face's own pixels."""
  def detect(rgb):
    out = []
    for x, y, w, h in vf.find_patches(rgb, tol=tol):
      s = w / (1 + 2 * margin)
      out.append((x + (w - s) / 2, y + (h - s) / 2, s, s))
    return out
  return detect


@pytest.fixture(scope="module")
def setting(run_dir):
  """The predictor, two faces whose predicted classes differ, and a third."""
  detector = _inner_box_detector(0.1)
  p = predict.Predictor.from_workdir(run_dir, checkpoint="latest",
                                     batch_size=8, face_detector=detector)
  assert p.margin == 0.1 and p.input_size == 24
  src = data.source(use_fixtures.run_data(run_dir), "val")
  faces = np.stack([src[i]["image"] for i in range(len(src))])
  logits, _ = p.predict_arrays(faces)
  cls = logits.argmax(1)
  common = np.bincount(cls).argmax()
  odd = np.flatnonzero(cls != common)
  assert len(odd), ("the tiny run predicts one class for every val face; the "
                    "timeline check needs two faces it tells apart")
  same = np.flatnonzero(cls == common)
  return p, faces[odd[0]], faces[same[0]], faces[same[1]]


def _clip(face_a1, face_a2, face_b, n=12, switch=6, empty=4):
  """Face A moves right (expression a1, then a2 from frame ``switch``), face
  B moves left; frame ``empty`` shows no face."""
  frames = []
  for i in range(n):
    placed = [] if i == empty else [
        vf.Placed(face_a1 if i < switch else face_a2, 2 + 2 * i, 4),
        vf.Placed(face_b, W - 26 - 2 * i, 28)]
    frames.append(vf.compose(W, H, placed))
  return frames


def test_video_rows_equal_photo_path_tracks_keep_ids_timeline_follows(
    setting, tmp_path):
  p, face_a1, face_a2, face_b = setting
  frames = _clip(face_a1, face_a2, face_b)
  path = tmp_path / "two_faces.mkv"
  vf.write(path, frames, fps=FPS)  # FFV1: lossless.
  decoded = vf.decode(path)
  assert len(decoded) == len(frames)
  assert all(np.array_equal(a, b) for a, b in zip(decoded, frames))

  rows = p.predict_video(path, smooth=0.25)
  assert [r["frame"] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6,
                                        7, 7, 8, 8, 9, 9, 10, 10, 11, 11]
  assert rows[8]["status"] == "error" and rows[8]["error"].startswith("no_face")
  ok = [r for r in rows if r["status"] == "ok"]
  assert len(ok) == 22
  for r in rows:
    assert math.isclose(r["time"], r["frame"] / FPS, abs_tol=1e-6)

  # The photo path on the same frames (PNG files: the decoded pixels).
  names = []
  for i, f in enumerate(frames):
    names.append(str(tmp_path / f"frame{i:02d}.png"))
    Image.fromarray(f).save(names[-1])
  photo = [r for r in p.predict(names) if r["status"] == "ok"]
  assert [(r["path"], r["face_box"]) for r in photo] == [
      (names[r["frame"]], r["face_box"]) for r in ok]
  for v, ph in zip(ok, photo):
    np.testing.assert_allclose(
        [v[f"prob_{n}"] for n in p.names] + [v["valence"], v["arousal"]],
        [ph[f"prob_{n}"] for n in p.names] + [ph["valence"], ph["arousal"]],
        atol=1e-6)
    assert v["class"] == ph["class"]

  # Tracks: A (top, moving right) and B (bottom, moving left) keep their
  # ids across every frame, the faceless frame 4 included.
  a = [r for r in ok if float(r["face_box"].split()[1]) < 20]
  b = [r for r in ok if float(r["face_box"].split()[1]) >= 20]
  assert len(a) == len(b) == 11
  assert {r["track"] for r in a} == {1} and {r["track"] for r in b} == {2}

  # The timeline: A's class is its first face's until frame 6, then the other's.
  before = {r["class"] for r in a if r["frame"] < 6}
  after = {r["class"] for r in a if r["frame"] >= 6}
  assert len(before) == len(after) == 1 and before != after
  assert len({r["class"] for r in b}) == 1

  # Smoothing: an EMA over time, per track, beside the raw values.
  s = [r["valence"] for r in a]
  ema = [s[0]]
  times = [r["time"] for r in a]
  for k in range(1, len(s)):
    alpha = 1 - math.exp(-(times[k] - times[k - 1]) / 0.25)
    ema.append(ema[-1] + alpha * (s[k] - ema[-1]))
  np.testing.assert_allclose([r["valence_smooth"] for r in a], ema, atol=1e-9)
  assert a[5]["valence_smooth"] != a[5]["valence"]  # First frame after the switch.

  # Centred smoothing: the mean of the track's faces within 0.15 s either
  # side (frames k-1, k, k+1 at 10 fps; fewer at the track's ends).
  rows_c = p.predict_video(path, smooth=0.3, smooth_mode="centred")
  a_c = [r for r in rows_c if r["status"] == "ok" and r["track"] == 1]
  assert [r["valence"] for r in a_c] == [r["valence"] for r in a]
  for r in a_c:
    near = [q["valence"] for q in a_c if abs(q["time"] - r["time"]) <= 0.15 + 1e-6]
    assert r["valence_smooth"] == pytest.approx(np.mean(near), abs=1e-9)
    assert len(near) in (2, 3)

  # --fps: the first frame of each 1/fps slot.
  sampled = p.predict_video(path, fps=4.0)
  assert sorted({r["frame"] for r in sampled}) == [0, 3, 5, 8, 10]


def test_unreadable_frame_gets_a_row_and_the_run_goes_on(setting, tmp_path):
  p, face_a1, _, face_b = setting
  frames = _clip(face_a1, face_a1, face_b, n=5, empty=-1)
  path = tmp_path / "damaged.avi"
  vf.write(path, frames, fps=FPS, fourcc="MJPG")
  vf.corrupt_jpeg_frame(path, 2)
  exact, p.face_detector = p.face_detector, _inner_box_detector(0.1, tol=60)
  try:  # JPEG frames: the canvas rings around the faces.
    rows = p.predict_video(path)
  finally:
    p.face_detector = exact
  assert [(r["frame"], r["status"]) for r in rows] == [
      (0, "ok"), (0, "ok"), (1, "ok"), (1, "ok"), (2, "error"), (3, "ok"),
      (3, "ok"), (4, "ok"), (4, "ok")]
  assert rows[4]["error"].startswith("unreadable_frame")
  assert {r["track"] for r in rows if r["status"] == "ok"} == {1, 2}


def test_a_corrupt_video_is_named_and_the_other_inputs_run(setting, tmp_path):
  p, face_a1, _, face_b = setting
  bad = tmp_path / "broken.mp4"
  bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
  with pytest.raises(video.VideoError, match="broken.mp4"):
    p.predict_video(bad)
  good = tmp_path / "good.mkv"
  vf.write(good, _clip(face_a1, face_a1, face_b, n=2, empty=-1), fps=FPS)
  Image.fromarray(vf.compose(W, H, [vf.Placed(face_b, 5, 5)])).save(
      tmp_path / "photo.png")
  empty = tmp_path / "empty.avi"  # Opens, holds no frame.
  cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), FPS,
                  (W, H)).release()
  rows = p.predict([str(bad), str(tmp_path / "photo.png"), str(good),
                    str(empty)], min_track_frames=1)
  assert [(r["path"], r["status"]) for r in rows] == [
      (str(bad), "error"), (str(tmp_path / "photo.png"), "ok"),
      (str(good), "ok"), (str(good), "ok"), (str(good), "ok"),
      (str(good), "ok"), (str(empty), "error")]
  assert "unreadable_video" in rows[0]["error"] and "broken.mp4" in rows[0]["error"]
  assert rows[-1]["error"].startswith("no_frames")


def test_iou_tracker_links_by_overlap_and_ends_stale_tracks():
  t = tracks.IouTracker(min_iou=0.3, max_gap=1.0)
  assert t.update([(0, 0, 10, 10), (50, 0, 10, 10)], 0.0) == [1, 2]
  # Listed in the other order, each moved a little: the same ids.
  assert t.update([(52, 1, 10, 10), (2, 1, 10, 10)], 0.1) == [2, 1]
  # A box overlapping neither enough is a new person.
  assert t.update([(2, 1, 10, 10), (30, 30, 10, 10)], 0.2) == [1, 3]
  assert t.ended == []
  # Track 2 unseen for over 1 s: a face at its place gets a new id.
  assert t.update([(52, 1, 10, 10)], 1.5) == [4]
  assert t.ended == [1, 2, 3]


def test_short_tracks_are_marked_and_kept_tracks_are_not(setting, tmp_path):
  """A face seen in 2 frames (a false detection, typically) is marked
  short_track; the person seen in every frame is not."""
  p, face_a1, _, face_b = setting
  frames = [vf.compose(W, H, [vf.Placed(face_a1, 2 + i, 4)]
                       + ([vf.Placed(face_b, 60, 28)] if i in (3, 4) else []))
            for i in range(8)]
  path = tmp_path / "blip.mkv"
  vf.write(path, frames, fps=FPS)
  rows = p.predict_video(path)
  assert [(r["frame"], r["track"], r["status"]) for r in rows] == [
      (0, 1, "ok"), (1, 1, "ok"), (2, 1, "ok"), (3, 1, "ok"), (3, 2, "error"),
      (4, 1, "ok"), (4, 2, "error"), (5, 1, "ok"), (6, 1, "ok"), (7, 1, "ok")]
  for r in (rows[4], rows[6]):
    assert r["error"].startswith("short_track: track 2 has 2 face(s)")
    assert "class" not in r and "valence" not in r and r["face_box"]
  every = p.predict_video(path, min_track_frames=1)
  assert [r["status"] for r in every] == ["ok"] * 10
  # The same faces, the same predictions, whether a track waited or not.
  assert [r.get("valence") for r in rows if r["track"] == 1] == [
      r["valence"] for r in every if r["track"] == 1]


def test_decoder_end_wins_over_the_announced_count(setting, tmp_path):
  """An mkv announcing 2 s (20 frames at 10 fps) that holds 12: 12 frames of
  rows, no invented unreadable_frame rows at the end."""
  p, face_a1, _, face_b = setting
  path = tmp_path / "long_claim.mkv"
  vf.write(path, _clip(face_a1, face_a1, face_b, n=12, empty=-1), fps=FPS)
  vf.set_mkv_duration(path, 2.0)
  reader = video.VideoReader(path)
  assert reader.count == 20  # What OpenCV announces.
  assert len(list(reader)) == 12 and reader.frames_read == 12
  rows = p.predict_video(path)
  assert len(rows) == 24 and {r["status"] for r in rows} == {"ok"}
  assert max(r["frame"] for r in rows) == 11


def test_rotation_metadata_gives_upright_frames_and_boxes(setting, tmp_path):
  """A phone's portrait video: stored 96x56 with a 90-degree display matrix;
  frames come out 56 wide and 96 high, and the face boxes are where the
  face is in the upright picture."""
  p, face_a1, _, _ = setting
  frames = [vf.compose(W, H, [vf.Placed(face_a1, 10 + i, 6)]) for i in range(4)]
  path = tmp_path / "portrait.mp4"
  vf.write(path, frames, fps=FPS, fourcc="mp4v")
  vf.set_rotation(path, 90)
  reader = video.VideoReader(path)
  assert reader.rotation == 90 and (reader.width, reader.height) == (H, W)
  first = next(iter(reader))
  reader.close()
  upright = np.rot90(frames[0], k=-1)  # 90 degrees clockwise.
  assert first.image.shape == upright.shape == (W, H, 3)
  assert np.abs(first.image.astype(int) - upright).mean() < 4
  exact, p.face_detector = p.face_detector, _inner_box_detector(0.1, tol=60)
  try:  # MPEG-4 frames: the canvas rings around the faces.
    rows = p.predict_video(path)
  finally:
    p.face_detector = exact
  assert [r["status"] for r in rows] == ["ok"] * 4
  for i, r in enumerate(rows):
    x, y, w, h = map(float, r["face_box"].split())
    # The face's centre (10 + i + 12, 6 + 12) turned 90 degrees clockwise.
    cx, cy = H - (6 + 12), 10 + i + 12
    assert abs(x + w / 2 - cx) <= 2 and abs(y + h / 2 - cy) <= 2, r


def test_hd_frames_are_downscaled_for_detection_boxes_scaled_back():
  seen = []

  def recording(rgb):
    seen.append(rgb.shape)
    return [(100, 50, 40, 40, 0.9)]
  detect = face_detect.scaled(recording, face_detect.MAX_SIDE)
  (x, y, w, h, s), = detect(np.zeros((720, 1280, 3), np.uint8))
  assert seen == [(540, 960, 3)]
  assert (x, y, w, h, s) == pytest.approx((100 / 0.75, 50 / 0.75, 40 / 0.75,
                                           40 / 0.75, 0.9))
  assert detect(np.zeros((360, 640, 3), np.uint8))[0][:4] == (100, 50, 40, 40)
  assert seen[-1] == (360, 640, 3)
  # The real detector on a real HD frame: the face found where it is.
  big = vf.compose(1280, 720, [vf.Placed(vf.face(1, 3, 288), 500, 200)])
  (x, y, w, h, _), = face_detect.make("libfacedetection")(big)
  assert 500 < x + w / 2 < 788 and 200 < y + h / 2 < 488 and w > 120


def test_annotated_copy_keeps_real_time_and_is_webm_vp8(setting, tmp_path):
  """12 frames at 10 fps, each a different grey, sampled at --fps=4 (frames
  0, 3, 5, 8, 10): the copy has 12 frames at 10 fps, frame k showing the
  last sampled frame at or before k; VP8 in WebM."""
  p, face_a1, _, face_b = setting
  frames = []
  for i in range(12):
    f = vf.compose(W, H, [vf.Placed(face_a1, 2, 4), vf.Placed(face_b, 60, 28)])
    f[46:, 0:40] = 20 * i  # A grey patch no drawing covers: the frame's number.
    frames.append(f)
  path = tmp_path / "grey.mkv"
  vf.write(path, frames, fps=FPS)
  rows = p.predict_video(path, fps=4.0)
  assert sorted({r["frame"] for r in rows}) == [0, 3, 5, 8, 10]
  log = tracks.TrackLog.from_rows(rows, p.names)
  out = video_pictures.write_annotated(path, log, tmp_path / "a.webm", fps=4.0)
  assert out == tmp_path / "a.webm"
  cap = cv2.VideoCapture(str(out))
  assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(FPS)
  fourcc = int(cap.get(cv2.CAP_PROP_FOURCC))
  assert fourcc.to_bytes(4, "little").decode().upper() == "VP80"
  cap.release()
  got = vf.decode(out)
  assert len(got) == 12
  shown = [max(s for s in (0, 3, 5, 8, 10) if s <= k) for k in range(12)]
  band = [int(round(g[48:54, 4:36].mean() / 20)) for g in got]
  assert band == shown


def test_killed_run_leaves_its_rows_on_disk(run_dir, tmp_path):
  """Rows are written as they come: a run killed (SIGKILL) mid-video leaves
  OUTPUT.partial with a row for every sampled frame up to where it got."""
  f1 = vf.face(1, 3, 40)
  frames = [vf.compose(120, 64, [vf.Placed(f1, 10 + (i % 40), 10)])
            for i in range(2000)]
  clip = tmp_path / "long.mkv"
  vf.write(clip, frames, fps=25.0)
  out = tmp_path / "out" / "rows.csv"
  partial = tmp_path / "out" / "rows.csv.partial"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
      [sys.executable, "-m", "affectjax.predict", f"--workdir={run_dir}",
       "--checkpoint=latest", f"--output={out}", "--batch_size=8",
       "--detector=haar", str(clip)],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if partial.exists() and len(partial.read_text().splitlines()) > 20:
        break
      time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    proc.stderr.close()
  assert not out.exists()
  rows = list(csv.DictReader(open(partial)))
  assert len(rows) > 20
  assert [int(r["frame"]) for r in rows] == list(range(len(rows)))
  assert max(int(r["frame"]) for r in rows) < 1999  # Stopped mid-video.
  assert all(r["status"] == "ok" and r["track"] == "1" for r in rows)


def test_cli_writes_table_pictures_and_annotated_copy(run_dir, tmp_path):
  """A real detector (OpenCV's cascade: it scores these drawn faces more
  evenly than libfacedetection, whose own CLI test is in test_predict.py)
  on drawn faces it finds, a photo and a corrupt video in the same call."""
  f1, f2 = vf.face(1, 3, 72), vf.face(2, 6, 72)
  frames = [vf.compose(240, 96, [vf.Placed(f1, 4 + 3 * i, 8),
                                 vf.Placed(f2, 160 - 3 * i, 12)])
            for i in range(5)] + [vf.compose(240, 96, [])]  # Last: no face.
  clip = tmp_path / "in" / "talk.mkv"
  clip.parent.mkdir()
  vf.write(clip, frames, fps=FPS)
  Image.fromarray(data.source(use_fixtures.run_data(run_dir), "val")[3][
      "image"]).save(tmp_path / "in" / "face.png")
  (tmp_path / "in" / "broken.webm").write_bytes(b"not a video")
  out = tmp_path / "out" / "table.csv"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "affectjax.predict", f"--workdir={run_dir}",
       "--checkpoint=latest", f"--output={out}", "--smooth=0.5",
       "--annotate", "--detector=haar", str(tmp_path / "in" / "face.png"), str(clip),
       str(tmp_path / "in" / "broken.webm")],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = list(csv.DictReader(open(out)))
  assert list(rows[0])[:6] == ["path", "frame", "time", "track", "face_box",
                               "face_score"]
  assert "valence_smooth" in rows[0] and rows[0]["frame"] == ""  # The photo.
  vid = [r for r in rows if r["path"] == str(clip)]
  assert [r["status"] for r in vid] == ["ok"] * 10 + ["error"], vid
  assert vid[-1]["error"].startswith("no_face") and vid[-1]["frame"] == "5"
  assert sorted({r["track"] for r in vid}) == ["", "1", "2"]
  assert all(float(r["face_score"]) > 1 for r in vid[:10])  # Haar's weights.
  assert rows[-1]["path"].endswith("broken.webm")
  assert "unreadable_video" in rows[-1]["error"]
  assert "(1 could not be read; 1 without a face;" in proc.stdout
  assert not (tmp_path / "out" / "table.csv.partial").exists()
  folder = tmp_path / "out" / "talk"
  assert sorted(os.listdir(folder)) == ["talk_annotated.webm", "track_1.png",
                                        "track_2.png", "tracks.csv"]
  assert Image.open(folder / "track_1.png").size[0] > 300
  # tracks.csv: one row per track, from the table's rows.
  table = list(csv.DictReader(open(folder / "tracks.csv")))
  assert [t["track"] for t in table] == ["1", "2"]
  for t in table:
    own = [r for r in vid if r["track"] == t["track"]]
    assert int(t["frames"]) == len(own) == 5
    assert float(t["first_time"]) == float(own[0]["time"])
    assert float(t["last_time"]) == float(own[-1]["time"])
    for k in ("valence", "arousal"):
      assert float(t[f"mean_{k}"]) == pytest.approx(
          np.mean([float(r[k]) for r in own]), abs=2e-6)
    names = [r["name"] for r in own]
    top = max(set(names), key=names.count)
    assert names.count(t["name"]) == names.count(top)
    assert float(t["share"]) == pytest.approx(names.count(top) / 5)
  annotated = vf.decode(folder / "talk_annotated.webm")
  assert len(annotated) == 6 and annotated[0].shape == (96, 240, 3)
  # Boxes, labels and dials drawn on the faces' frames (VP8 alone moves
  # these frames by a few levels, the drawing by about 16), nothing on the
  # empty one.
  diff = [np.abs(a.astype(int) - f).mean() for a, f in zip(annotated, frames)]
  assert min(diff[:5]) > 10 and diff[5] < 2, diff
  assert not (tmp_path / "out" / "broken").exists()


def test_gcs_video_is_read_once_for_rows_and_annotated_copy(setting, tmp_path,
                                                             monkeypatch):
  """A video on gs:// (the local GCS emulator): streamed to one local copy
  that serves both the rows and the annotated copy; its bytes are fetched
  once, never read whole with read_bytes."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from tests import gcs_emulator  # pylint: disable=g-import-not-at-top
  p, face_a1, _, face_b = setting
  local = tmp_path / "talk.mkv"
  vf.write(local, _clip(face_a1, face_a1, face_b, n=6, empty=-1), fps=FPS)
  with gcs_emulator.Emulator(tmp_path / "emulator.log") as emu:
    for k, v in emu.env().items():
      monkeypatch.setenv(k, v)
    remote = "gs://bucket/clips/talk.mkv"
    epath.Path(remote).write_bytes(local.read_bytes())
    gpath = type(epath.Path(remote))
    opened = []
    real_open = gpath.open

    def counting_open(self, mode="r", *args, **kwargs):
      if os.fspath(self) == remote and "r" in mode:
        opened.append(mode)
      return real_open(self, mode, *args, **kwargs)

    def no_read_bytes(self):
      raise AssertionError(f"{self} read whole")
    monkeypatch.setattr(gpath, "open", counting_open)
    monkeypatch.setattr(gpath, "read_bytes", no_read_bytes)
    rows = []
    table = "gs://bucket/out/t.csv"
    with predict_table.RowWriter(table, p.columns(videos=True)) as out:
      path, folder, written = predict.run_video(
          p, remote, tmp_path / "out" / "t.csv", set(),
          lambda row: (rows.append(row), out.write(row)), annotate=True)
      partial = out.partial  # A local file while the run goes on.
      assert len(open(partial).read().splitlines()) == 13
    back = list(csv.DictReader(io.StringIO(epath.Path(table).read_text())))
  assert [r["frame"] for r in back] == [str(r["frame"]) for r in rows]
  assert not os.path.exists(partial)
  assert opened == ["rb"]
  assert path == remote and [r["status"] for r in rows] == ["ok"] * 12
  assert {r["path"] for r in rows} == {remote}
  assert sorted(os.path.basename(os.fspath(w)) for w in written) == [
      "talk_annotated.webm", "track_1.png", "track_2.png", "tracks.csv"]
  assert len(vf.decode(folder / "talk_annotated.webm")) == 6
