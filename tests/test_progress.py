"""`affectjax.progress`: what the bar shows, and when it stays quiet."""
import io
import time

from affectjax import progress


def test_train_progress_shows_step_scalars_and_resumes_from_initial_step():
  out = io.StringIO()
  bar = progress.TrainProgress(10, initial_step=4, enabled=True, file=out)
  bar.update(6, loss=0.51234, learning_rate=1e-4, images_per_sec=1234.5,
             data_wait=0.25)
  bar.close()
  text = out.getvalue()
  assert "6/10" in text and "loss=0.5123" in text and "lr=1.00e-04" in text
  assert "img/s=1234" in text and "data_wait=25%" in text
  assert bar.step == 6


def test_quiet_when_not_a_terminal():
  out = io.StringIO()  # Not a tty: tqdm's disable=None switches it off.
  bar = progress.TrainProgress(10, file=out)
  bar.update(3, loss=1.0)
  bar.close()
  assert not bar.enabled and out.getvalue() == ""


def test_data_wait_share():
  wait = progress.DataWait()
  with wait:
    time.sleep(0.05)
  time.sleep(0.05)
  share = wait.share()
  assert 0.3 < share < 0.7
  assert wait.share() < 0.05  # A new window started.


def test_data_prep_bar_stays_out_of_a_log(tmp_path, capfd):
  """prepare's default bar writes nothing when stderr is not a terminal (a
  log file, CI), and draws when asked for."""
  from data_prep import affectnet, synthetic  # pylint: disable=g-import-not-at-top
  synthetic.generate(str(tmp_path / "raw"), num_train=16, num_val=8, seed=0)
  capfd.readouterr()
  affectnet.prepare(str(tmp_path / "raw"), str(tmp_path / "quiet"),
                    image_size=16, num_workers=1)
  err = capfd.readouterr().err
  assert "img/s" not in err and "%|" not in err, err
  affectnet.prepare(str(tmp_path / "raw"), str(tmp_path / "forced"),
                    image_size=16, num_workers=1, progress=True)
  assert "img/s" in capfd.readouterr().err  # The check above can see a bar.
