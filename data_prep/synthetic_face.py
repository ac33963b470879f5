r"""One synthetic face: what it shows, what its annotator wrote, and how it
is drawn (`data_prep.synthetic` writes a dataset of them).

How a face is drawn. The 68 iBUG landmarks are computed first, in face-local
units, from a few expression parameters, then transformed (scale, roll, yaw
shift, position) into image pixels and the face is drawn *from the landmarks*,
so the CSV landmarks match the pixels exactly. The parameters:
  * mouth corner lift follows valence (smile vs. frown), mouth opening follows
    arousal; each class adds its own shape (Surprise: round O; Fear: wide
    stretched and open; Happy: wide with teeth; Anger: pressed or snarling;
    Disgust: raised upper lip + nose wrinkles; Contempt: one-sided smirk
    with a dimple).
  * eye opening and brow height follow arousal; brow angle is per class
    (Anger: inner ends down; Sad/Fear: inner ends up; Contempt: one raised).

Why it is not trivial. Real AffectNet tops out near 63% 8-class accuracy, with
annotators disagreeing on many images; a dataset a small CNN solves perfectly
teaches nothing about that regime. So, like real faces (`sample_face`):
  * Intensity. Each image draws an expression intensity ~ Beta(1.5, 2)
    (`INTENSITY_BETA`, mean 0.43, about a third below 0.3): the class shape
    is neutral + intensity * (class - neutral), so many expressions are
    subtle and shade into Neutral. Discrete traits become strengths: teeth
    show above strength 0.5, disgust draws one nose wrinkle per third of
    strength, the contempt smirk (and its dimple, drawn above strength
    0.25) scales continuously.
  * Valence/arousal follow intensity: an image's Gaussian mean is the class
    mean times 1 + (intensity - 0.43) (`VA_INTENSITY_GAIN`), so intense faces
    carry stronger labels while class averages stay at `VA_MEAN_STD`; the
    drawn values drive the mouth/eyes/brows, so regression stays learnable
    from pixels.
  * Annotator ambiguity. 15% of faces (`AMBIGUOUS_FRACTION`) are drawn as a
    blend of the labelled class and a confusable one (`CONFUSABLE`: fear <->
    surprise, disgust <-> anger, contempt <-> happy/neutral, sad <->
    neutral/disgust, neutral <-> sad/contempt), weight toward the other class
    ~ U(0.3, 0.7); their valence/arousal means blend the same way. The
    expression label stays the annotator's (the labelled class).
  * Label noise. The CSV valence/arousal are the drawn values plus
    N(0, 0.14) (`VA_LABEL_NOISE`), like inter-annotator spread, clipped.
Nuisance: skin tone, hair, background gradient + clutter, face scale,
position, roll (sd 0.18 rad), yaw (+-0.3 face half-widths). Occluders, each
independent (`P_*`): a hair fringe (25%; ragged, tilted, may reach one eye),
glasses (18%) or sunglasses (3%, the only occluder that hides the eyes), a
hand at the chin/cheek (12%; its centre stays off the mouth centre, so at
most one mouth corner is covered), an object entering from the side (12%).
Then degradations: low resolution (25%: down to 30-70% and back up), Gaussian
blur (50%, radius 0.3-1.8 px), exposure 0.6-1.25 with a colour cast and a
linear lighting gradient in a random direction (up to +-45%), black-and-white
(8%), sensor noise (sd 2-14) and JPEG quality 30-95. Landmarks are those of
the face under the occluders, as in AffectNet.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (valence mean, valence std, arousal mean, arousal std) per class, shaped
# after the per-class statistics of AffectNet's annotations.
VA_MEAN_STD = (
    (0.00, 0.12, 0.00, 0.12),    # neutral
    (0.70, 0.12, 0.35, 0.15),    # happy
    (-0.65, 0.15, -0.30, 0.15),  # sad
    (0.10, 0.20, 0.70, 0.12),    # surprise
    (-0.50, 0.15, 0.70, 0.12),   # fear
    (-0.65, 0.12, 0.35, 0.15),   # disgust
    (-0.55, 0.15, 0.65, 0.12),   # anger
    (-0.35, 0.15, 0.25, 0.15),   # contempt
)
# Per-class expression shape, in face-local units (face half-width = 1):
# mouth half-width, base opening, brow inner drop (+ = V / angry),
# brow base raise, eye opening, teeth shown, nose wrinkle, smirk (one corner).
_SHAPE = {
    0: dict(mw=0.36, mo=0.00, bi=0.00, br=0.00, eo=0.85, teeth=0, wr=0, sm=0),
    1: dict(mw=0.50, mo=0.16, bi=0.00, br=0.05, eo=0.65, teeth=1, wr=0, sm=0),
    2: dict(mw=0.34, mo=0.00, bi=-0.22, br=-0.05, eo=0.55, teeth=0, wr=0,
            sm=0),
    3: dict(mw=0.20, mo=0.45, bi=-0.05, br=0.35, eo=1.45, teeth=0, wr=0, sm=0),
    4: dict(mw=0.46, mo=0.24, bi=-0.25, br=0.22, eo=1.35, teeth=1, wr=0, sm=0),
    5: dict(mw=0.36, mo=0.10, bi=0.08, br=-0.12, eo=0.40, teeth=1, wr=1, sm=0),
    6: dict(mw=0.34, mo=0.05, bi=0.30, br=-0.10, eo=0.95, teeth=1, wr=0, sm=0),
    7: dict(mw=0.36, mo=0.00, bi=0.00, br=0.00, eo=0.70, teeth=0, wr=0, sm=1),
}
_SKIN_TONES = ((255, 224, 196), (241, 194, 125), (224, 172, 105),
               (198, 134, 66), (141, 85, 36), (92, 56, 30), (255, 205, 170))
NEUTRAL = 0
# Expression intensity ~ Beta(a, b) on [0, 1]: skewed low, so many faces show
# only a subtle version of their class (0 = neutral face, 1 = full shape).
INTENSITY_BETA = (1.5, 2.0)
# Valence/arousal means scale with intensity: the mean for an image is the
# class mean times 1 + VA_INTENSITY_GAIN * (intensity - E[intensity]), so the
# class averages stay AffectNet-like while subtle faces get milder labels.
VA_INTENSITY_GAIN = 1.0
# Fraction of faces drawn as a blend of the labelled class and a confusable
# one (annotator disagreement); the blend weight toward the confusable class
# is uniform in AMBIGUOUS_BLEND (above 0.5 the face looks more like the other
# class than like its label).
AMBIGUOUS_FRACTION = 0.15
AMBIGUOUS_BLEND = (0.3, 0.7)
CONFUSABLE = {
    0: (2, 7),   # neutral <-> sad, contempt
    1: (7, 0),   # happy <-> contempt, neutral
    2: (0, 5),   # sad <-> neutral, disgust
    3: (4,),     # surprise <-> fear
    4: (3,),     # fear <-> surprise
    5: (6,),     # disgust <-> anger
    6: (5,),     # anger <-> disgust
    7: (1, 0),   # contempt <-> happy, neutral
}
# Inter-annotator spread: the CSV valence/arousal are the drawn values plus
# N(0, VA_LABEL_NOISE), clipped to [-1, 1].
VA_LABEL_NOISE = 0.14
# Nuisance probabilities (per image, independent).
P_GLASSES, P_SUNGLASSES = 0.18, 0.03  # sunglasses: of all faces
P_FRINGE = 0.25   # hair fringe over the forehead, sometimes one eye
P_HAND = 0.12     # a hand at the chin/cheek, covering at most part of the mouth
P_OBJECT = 0.12   # an object entering from the image edge
P_LOWRES = 0.25   # downscaled and upscaled (small source photo)
P_GRAY = 0.08     # black-and-white photo


def _arc(x0, x1, y, lift_l, lift_r, bulge, n):
  """n points from x0 to x1: ends raised by lift_*, middle pushed by bulge."""
  t = np.linspace(0.0, 1.0, n)
  xs = x0 + (x1 - x0) * t
  ys = y - lift_l * (1 - t) - lift_r * t + bulge * np.sin(np.pi * t)
  return np.stack([xs, ys], 1)


def sample_face(expression: int, rng: np.random.Generator) -> dict:
  """What one image shows and what its annotator wrote (module docstring).

  Returns a dict: `intensity` in [0, 1]; `other` (a confusable class) and
  `blend` (weight toward it, 0 when the face is unambiguous); the drawn
  `valence`/`arousal` that drive the pixels; and the labels `valence_label`/
  `arousal_label` (drawn + annotator noise), all floats in [-1, 1].
  """
  expression = int(expression)
  intensity = float(rng.beta(*INTENSITY_BETA))
  other, blend = expression, 0.0
  if rng.random() < AMBIGUOUS_FRACTION:
    choices = CONFUSABLE[expression]
    other = int(choices[rng.integers(len(choices))])
    blend = float(rng.uniform(*AMBIGUOUS_BLEND))
  a_, b_ = INTENSITY_BETA
  gain = 1.0 + VA_INTENSITY_GAIN * (intensity - a_ / (a_ + b_))
  stats = np.asarray(VA_MEAN_STD, np.float64)
  mix = (1 - blend) * stats[expression] + blend * stats[other]
  vm, vs, am, as_ = mix
  v = float(np.clip(rng.normal(vm * gain, vs), -1, 1))
  a = float(np.clip(rng.normal(am * gain, as_), -1, 1))
  v_label = float(np.clip(v + rng.normal(0, VA_LABEL_NOISE), -1, 1))
  a_label = float(np.clip(a + rng.normal(0, VA_LABEL_NOISE), -1, 1))
  return dict(intensity=intensity, other=other, blend=blend, valence=v,
              arousal=a, valence_label=v_label, arousal_label=a_label)


def _sample_va(expression: int, rng: np.random.Generator):
  """(valence, arousal) as drawn for a full-intensity, unambiguous face."""
  vm, vs, am, as_ = VA_MEAN_STD[int(expression)]
  v = float(np.clip(rng.normal(vm, vs), -1, 1))
  a = float(np.clip(rng.normal(am, as_), -1, 1))
  return v, a


def expression_shape(expression: int, intensity: float = 1.0,
                     other: int | None = None, blend: float = 0.0) -> dict:
  """Shape parameters: neutral + intensity * (blended class - neutral).

  Discrete traits (teeth, nose wrinkle, smirk) become strengths in [0, 1].
  """
  n = _SHAPE[NEUTRAL]
  cls = _SHAPE[int(expression)]
  oth = _SHAPE[int(expression if other is None else other)]
  return {k: n[k] + intensity * ((1 - blend) * (cls[k] - n[k]) +
                                 blend * (oth[k] - n[k])) for k in n}


def face_landmarks(expression: int, valence: float, arousal: float,
                   rng: np.random.Generator, *, intensity: float = 1.0,
                   other: int | None = None, blend: float = 0.0
                   ) -> tuple[np.ndarray, dict]:
  """68 iBUG landmarks in face-local units plus the drawing parameters."""
  s = expression_shape(expression, intensity, other, blend)
  a_pos = max(arousal, 0.0)
  sm = s["sm"]
  # Valence -> mouth corner lift; arousal -> openness, eyes, brows.
  lift = 0.20 * valence + rng.normal(0, 0.02)
  mw = s["mw"] + 0.06 * valence + rng.normal(0, 0.015)
  mo = max(0.0, s["mo"] + 0.12 * a_pos + rng.normal(0, 0.015))
  eo = float(np.clip(s["eo"] + 0.35 * arousal + rng.normal(0, 0.05), 0.15,
                     1.8))
  br = s["br"] + 0.12 * arousal + rng.normal(0, 0.02)
  bi = s["bi"] + rng.normal(0, 0.02)
  lm = np.zeros((68, 2))
  # Jaw 0-16: lower half of the head ellipse (rx=1, ry=1.25), temple to temple.
  th = np.linspace(np.pi + 0.15, -0.15, 17)
  lm[0:17] = np.stack([np.cos(th), 1.25 * np.sin(th)], 1) * 0.97
  # Brows 17-21 (image-left, outer->inner) and 22-26 (inner->outer).
  by = -0.50 - br
  lm[17:22] = _arc(-0.78, -0.14, by, 0.0, -bi, -0.07, 5)
  lm[22:27] = _arc(0.14, 0.78, by - 0.16 * sm, -bi, 0.0, -0.07, 5)
  # Nose: bridge 27-30, nostrils 31-35.
  lm[27:31] = np.stack([np.zeros(4), np.linspace(-0.32, 0.12, 4)], 1)
  lm[31:36] = np.stack([np.linspace(-0.2, 0.2, 5),
                        0.22 + 0.04 * np.abs(np.linspace(-1, 1, 5)) * -1 +
                        0.03], 1)
  # Eyes: 36-41 (left) and 42-47 (right); corners, upper lid, lower lid.
  for base, cx in ((36, -0.42), (42, 0.42)):
    hw, hh, ey = 0.21, 0.11 * eo, -0.2
    pts = [(cx - hw, ey), (cx - hw / 3, ey - hh), (cx + hw / 3, ey - hh),
           (cx + hw, ey), (cx + hw / 3, ey + hh * 0.8),
           (cx - hw / 3, ey + hh * 0.8)]
    lm[base:base + 6] = pts
  # Mouth: outer 48-59, inner 60-67. Corners lift with valence; a smirk
  # (strength sm) pulls the left corner flat and lifts the right one.
  my = 0.62
  lift_l = lift * (1 - sm) - 0.02 * sm
  lift_r = lift * (1 - sm) + 0.30 * sm
  upper_raise = 0.14 * s["wr"]  # Disgust raises the upper lip.
  half_open = mo / 2
  lip = 0.07
  upper_outer = _arc(-mw, mw, my - half_open - lip - upper_raise, lift_l,
                     lift_r, -0.03 * (1 - sm), 7)
  lower_outer = _arc(mw, -mw, my + half_open + lip, lift_r, lift_l,
                     0.06 * (1 if valence > 0 else 0.3), 7)
  lm[48:55] = upper_outer
  lm[55:60] = lower_outer[1:6]
  inner_w = mw * 0.85
  upper_inner = _arc(-inner_w, inner_w, my - half_open - upper_raise,
                     lift_l * 0.9, lift_r * 0.9, 0.0, 5)
  lower_inner = _arc(inner_w, -inner_w, my + half_open, lift_r * 0.9,
                     lift_l * 0.9, 0.04 * (valence > 0), 5)
  lm[60:65] = upper_inner
  lm[65:68] = lower_inner[1:4]
  # Teeth show once their strength passes a half; wrinkles draw one line per
  # third of strength, so a subtle disgust has one faint wrinkle or none.
  params = dict(mouth_open=mo + upper_raise, teeth=s["teeth"] > 0.5,
                wrinkle=int(round(3 * s["wr"])), smirk=sm, eye_open=eo)
  return lm, params


def _to_image(pts, cx, cy, scale, roll, yaw):
  """Face-local -> image pixels: yaw shifts features, then roll + scale."""
  x = pts[..., 0] + yaw * (1.0 - 0.35 * np.abs(pts[..., 0]))
  y = pts[..., 1]
  c, s = math.cos(roll), math.sin(roll)
  return np.stack([cx + scale * (c * x - s * y), cy + scale * (s * x + c * y)],
                  -1)


def _ellipse(cx, cy, rx, ry, n=40):
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _poly(draw, pts, **kw):
  draw.polygon([tuple(p) for p in np.asarray(pts).tolist()], **kw)


def _line(draw, pts, **kw):
  draw.line([tuple(p) for p in np.asarray(pts).tolist()], **kw)


def _draw_occluders(d, tf, rng, scale, skin, hair):
  """Glasses, hair fringe, a hand, an object: each independently, sized so
  that the eyes and mouth stay mostly visible (sunglasses excepted)."""
  lw = max(1, round(scale * 0.05))
  if rng.random() < P_FRINGE:
    # Fringe: from the hairline down to a ragged edge between forehead and
    # brows; tilted, so one side may reach the eye.
    y_l, y_r = -0.55 + rng.uniform(-0.25, 0.3, 2)
    xs = np.linspace(-1.0, 1.0, 9)
    edge = np.stack([xs, np.interp(xs, [-1, 1], [y_l, y_r]) +
                     rng.uniform(-0.06, 0.06, 9)], 1)
    _poly(d, tf(np.concatenate([[(-1.05, -1.3), (1.05, -1.3)], edge[::-1]])),
          fill=hair)
  sunglasses = rng.random() < P_SUNGLASSES
  if sunglasses or rng.random() < P_GLASSES:
    frame = tuple(rng.integers(0, 120, 3).tolist())
    for ex in (-0.42, 0.42):
      ring = tf(_ellipse(ex, -0.2, 0.3, 0.2, 20))
      if sunglasses:
        _poly(d, ring, fill=(25, 25, 30), outline=frame)
      else:
        _line(d, np.concatenate([ring, ring[:1]]), fill=frame, width=lw)
    _line(d, tf([(-0.12, -0.24), (0.12, -0.24)]), fill=frame, width=lw)
    _line(d, tf([(-0.72, -0.22), (-1.0, -0.28)]), fill=frame, width=lw)
    _line(d, tf([(0.72, -0.22), (1.0, -0.28)]), fill=frame, width=lw)
  if rng.random() < P_HAND:
    # A hand resting on the chin or a cheek: palm plus four fingers pointing
    # up and inward. Its centre stays at least half a mouth-width off the
    # mouth centre, so it covers at most one mouth corner.
    side = rng.choice((-1.0, 1.0))
    hx = side * rng.uniform(0.55, 1.0)
    hy = rng.uniform(0.75, 1.35)
    tone = tuple(int(c) for c in np.clip(np.asarray(skin) +
                                         rng.normal(0, 10, 3), 0, 255))
    _poly(d, tf(_ellipse(hx, hy, 0.32, 0.36, 20)), fill=tone)
    ang = -side * rng.uniform(0.2, 0.7)  # fingers lean toward the face
    for k in range(4):
      fx = hx - 0.24 + 0.16 * k
      length = 0.4 + 0.08 * (k in (1, 2))
      tip = (fx + math.sin(ang) * length, hy - 0.25 - math.cos(ang) * length)
      _line(d, tf([(fx, hy - 0.2), tip]), fill=tone,
            width=max(2, round(scale * 0.13)))
  if rng.random() < P_OBJECT:
    # Something entering from a corner (a shoulder, a microphone, a cup).
    colour = tuple(rng.integers(0, 256, 3).tolist())
    cx, cy = rng.choice((-1.6, 1.6)), rng.uniform(0.3, 1.9)
    _poly(d, tf(_ellipse(cx, cy, rng.uniform(0.4, 0.8),
                         rng.uniform(0.3, 0.9), 16)), fill=colour)


def render_face(expression: int, valence: float, arousal: float,
                rng: np.random.Generator, image_size: int = 144, *,
                intensity: float = 1.0, other: int | None = None,
                blend: float = 0.0, occlude: bool = True
                ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
  """Draws one face. Returns (uint8 image HxWx3, landmarks (68,2) px, box).

  intensity/other/blend shape the expression (see `expression_shape`);
  occlude=False turns off occluders, lighting and degradations (a clean
  face, for checks that look at specific pixels).
  """
  size = image_size
  lm_local, p = face_landmarks(expression, valence, arousal, rng,
                               intensity=intensity, other=other, blend=blend)
  # Face half-width in px: the head box (about 2.3 x 2.7 units) covers
  # roughly 50-75% of the image, leaving context around it like AffectNet.
  scale = size * rng.uniform(0.22, 0.30)
  cx = size / 2 + rng.uniform(-0.1, 0.1) * size
  cy = size / 2 + rng.uniform(-0.06, 0.1) * size
  roll = rng.normal(0, 0.18)
  yaw = rng.uniform(-0.3, 0.3)
  tf = lambda pts: _to_image(np.asarray(pts, np.float64), cx, cy, scale,
                             roll, yaw)

  # Background: a random two-colour vertical gradient plus clutter shapes.
  c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
  t = np.linspace(0, 1, size)[:, None, None]
  bg = (c0 * (1 - t) + c1 * t) * np.ones((1, size, 1))
  img = Image.fromarray(bg.astype(np.uint8))
  d = ImageDraw.Draw(img)
  for _ in range(rng.integers(1, 4)):
    x0, y0 = rng.uniform(0, size, 2)
    w, h = rng.uniform(0.1, 0.5, 2) * size
    d.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(rng.integers(0, 256, 3)))

  skin = np.asarray(_SKIN_TONES[rng.integers(len(_SKIN_TONES))], float)
  skin = tuple(np.clip(skin + rng.normal(0, 12, 3), 0, 255).astype(int))
  dark = tuple(int(v * 0.45) for v in skin)
  hair = tuple(rng.integers(0, 90, 3).tolist())
  # Neck, hair, ears, head.
  _poly(d, tf([(-0.45, 0.9), (0.45, 0.9), (0.55, 2.4), (-0.55, 2.4)]),
        fill=dark if rng.random() < 0.2 else skin)
  if rng.random() < 0.85:
    _poly(d, tf(_ellipse(0, -0.25, 1.12, 1.2)), fill=hair)
  for ex in (-1.0, 1.0):
    _poly(d, tf(_ellipse(ex, -0.1, 0.14, 0.26, 16)), fill=skin)
  _poly(d, tf(_ellipse(0, 0, 1.0, 1.25)), fill=skin)

  lm = tf(lm_local)
  lw = max(1, round(scale * 0.07))
  # Eyes: sclera polygon, iris disc clipped by drawing lids over it.
  for base in (36, 42):
    eye = lm[base:base + 6]
    _poly(d, eye, fill=(245, 245, 245))
    centre = eye.mean(0)
    r = scale * min(0.09, 0.11 * p["eye_open"])
    d.ellipse([centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r],
              fill=(60, 40, 20))
    _line(d, np.concatenate([eye, eye[:1]]), fill=dark, width=max(1, lw // 2))
  # Brows.
  _line(d, lm[17:22], fill=hair, width=lw + 1)
  _line(d, lm[22:27], fill=hair, width=lw + 1)
  # Nose.
  _line(d, lm[27:31], fill=dark, width=max(1, lw // 2))
  _line(d, lm[31:36], fill=dark, width=max(1, lw // 2))
  # Disgust: nose wrinkles; lw // 2 + 1 keeps them about a pixel wide after
  # the usual downscale to 48-64 px (a 1 px line at 144 px vanishes).
  for y in (-0.12, -0.02, 0.08)[:p["wrinkle"]]:
    _line(d, tf([(-0.18, y), (0.18, y + 0.03)]), fill=dark,
          width=lw // 2 + 1)
  # Mouth: lips, then the dark opening and teeth when open.
  outer = lm[48:60]
  lip = tuple(int(v) for v in np.clip(np.asarray(skin) * [0.8, 0.45, 0.45] +
                                      [40, 0, 0], 0, 255))
  _poly(d, outer, fill=lip)
  inner = lm[60:68]
  if p["mouth_open"] > 0.03:
    _poly(d, inner, fill=(50, 10, 15))
    if p["teeth"]:
      top = inner[:5]
      teeth = np.concatenate([top, top[::-1] + [0, scale * min(
          0.08, p["mouth_open"] * 0.5)]])
      _poly(d, teeth, fill=(240, 240, 230))
  else:
    _line(d, inner[:5], fill=(90, 20, 25), width=max(1, lw // 2))
  if p["smirk"] > 0.25:  # Contempt: a dimple beside the raised corner.
    x, y = lm_local[54]
    _line(d, tf([(x + 0.05, y - 0.10), (x + 0.10, y - 0.02),
                 (x + 0.08, y + 0.06)]), fill=dark, width=lw // 2 + 1)

  if occlude:
    _draw_occluders(d, tf, rng, scale, skin, hair)
  if occlude and rng.random() < P_LOWRES:
    small = max(16, round(size * rng.uniform(0.3, 0.7)))
    img = img.resize((small, small), Image.BILINEAR).resize((size, size),
                                                            Image.BILINEAR)
  if rng.random() < (0.5 if occlude else 0.3):
    img = img.filter(ImageFilter.GaussianBlur(
        rng.uniform(0.3, 1.8 if occlude else 1.0)))
  arr = np.array(img, np.float32)
  if occlude:
    # Lighting: global exposure and colour cast times a linear gradient
    # across the frame in a random direction (side or top light).
    # float32 throughout: float64 here would double the render time.
    ang = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    gain = (np.float32(np.cos(ang)) * ramp[None, :, None] +
            np.float32(np.sin(ang)) * ramp[:, None, None])
    gain = np.float32(rng.uniform(0.6, 1.25)) * (
        1 + np.float32(rng.uniform(0, 0.45)) * gain)
    arr *= gain * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    if rng.random() < P_GRAY:
      arr = np.repeat(arr @ np.asarray([0.299, 0.587, 0.114], np.float32),
                      3).reshape(arr.shape)
  sigma = rng.uniform(2, 14 if occlude else 9)
  # float32 normals: half the cost of float64 ones, the bulk of render time.
  arr = arr + sigma * rng.standard_normal(arr.shape, dtype=np.float32)
  arr = np.clip(arr, 0, 255).astype(np.uint8)

  # AffectNet's face box: a square around the head, with some slack/jitter.
  half = scale * rng.uniform(1.15, 1.3)
  bx0 = cx - half + rng.normal(0, 0.03) * scale
  by0 = cy - half * 1.05 + rng.normal(0, 0.03) * scale
  bx0, by0 = max(0, round(bx0)), max(0, round(by0))
  side = round(2 * half)
  bw, bh = min(side, size - bx0), min(side, size - by0)
  return arr, lm.astype(np.float32), (bx0, by0, bw, bh)
