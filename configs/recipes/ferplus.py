"""Recipe: FER+ (FER2013 relabelled by 10 annotators, 8 classes), majority vote.

FER+ (Barsoum et al., ICMI 2016; microsoft/FERPlus) gives every FER2013 face
ten crowd votes over neutral, happiness, surprise, sadness, anger, disgust,
fear and contempt (plus unknown and not-a-face). `data_prep` applies the
paper's majority-vote protocol (ties, unknown and not-a-face rows are skipped
and counted) and keeps FER2013's split: Training -> train, PublicTest
(FER2013Valid) -> holdout, PrivateTest (FER2013Test) -> val. No
valence/arousal: the multitask loss masks those targets.

Prepare either published layout once, at the native size:

  # fer2013new.csv (votes) beside Kaggle's fer2013.csv (pixels)
  ./launch.sh prep --input_dir=/data/ferplus --output_dir=data/ferplus --image_size=48
  # FER2013Train/ FER2013Valid/ FER2013Test/ folders of PNGs, each with label.csv
  ./launch.sh prep --input_dir=/data/FERPlus/data --output_dir=data/ferplus --image_size=48

Train and test (the same machinery and variants as configs/recipes/fer2013.py,
with AffectNet's 8 classes; :cpu runs 8,000 steps of 64, about 19 epochs of
FER+'s 26,940 majority-vote training faces, about 45 minutes on 2 CPU cores):

  ./launch.sh train --config=configs/recipes/ferplus.py:cpu \
      --config.data.dir=data/ferplus --workdir=runs/ferplus_cpu
  ./launch.sh evaluate --workdir=runs/ferplus_cpu --split=val   # FER2013Test, once
"""
from configs.recipes import fer2013


def get_config(arg: str | None = None):
  # :cpu is FER2013's fixed-length hour run (measured so, 82.44%), shortened.
  c = fer2013.get_config("cpu_hour" if arg == "cpu" else arg)
  c.num_classes = 8  # Contempt is one of FER+'s classes.
  if arg != "tiny":
    c.data.dir = "data/ferplus"
  if arg == "cpu":
    c.total_steps = 8_000
  elif arg not in (None, "", "tiny"):
    raise ValueError(f"Unknown variant {arg!r} of this recipe; use ':cpu', "
                     "':tiny' or none.")
  return c
