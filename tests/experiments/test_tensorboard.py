"""Watching a run: TensorBoard event files, the real TensorBoard server, curves and the report.

One tiny quickstart run is crashed right after it logged steps 15 and 20 past its step-10
checkpoint (an exception inside the step-20 save, as test_end_to_end's resume test does), then
resumed to the end. Everything below reads that workdir: TensorBoard's own reader and server
must show each step once, with metrics.jsonl's values.
"""
import importlib.util
import os
import socket
import subprocess
import sys
import time
import json
import urllib.request

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from configs import quickstart
from configs.common import override
from experiments import main as main_lib
from experiments import summaries
from experiments import validate
from experiments import workdir as wd
from experiments.options import ConfigError, WorkdirError

TRAIN_STEPS = [5, 10, 15, 20]  # configs/quickstart.py:tiny logs every 5, checkpoints every 10


def _tiny(**over):
  return override(quickstart.get_config("tiny"), **over)


class _Crash(Exception):
  pass


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("resumed"))
  orig_save = wd.Checkpointer.save

  def crash_at_20(self, step, state):
    if step == 20:  # rows 15 and 20 are logged, the last checkpoint is step 10
      raise _Crash()
    orig_save(self, step, state)

  wd.Checkpointer.save = crash_at_20
  try:
    with pytest.raises(_Crash):
      main_lib.run(_tiny(), workdir, "train")
  finally:
    wd.Checkpointer.save = orig_save
  crashed = [r["step"] for r in wd.read_metrics(workdir) if r["split"] == "train"]
  assert crashed == TRAIN_STEPS  # the crashed run logged past its checkpoint
  main_lib.run(_tiny(), workdir, "train")  # resumes at 10, trains to 20, samples
  return workdir


def _accumulator(workdir, split):
  acc = EventAccumulator(os.path.join(workdir, "tensorboard", split),
                         size_guidance={"scalars": 0, "images": 0, "tensors": 0})
  acc.Reload()
  return acc


def _rows(workdir, split):
  return [r for r in wd.read_metrics(workdir) if r["split"] == split]


def test_event_files_hold_metrics_jsonl_each_step_once(resumed):
  rows = _rows(resumed, "train")
  assert [r["step"] for r in rows] == TRAIN_STEPS  # metrics.jsonl: each step once
  train_dir = os.path.join(resumed, "tensorboard", "train")
  assert len(os.listdir(train_dir)) == 2  # the crashed run's file and the resumed run's
  acc = _accumulator(resumed, "train")
  for key in ("loss", "grad_norm", "learning_rate", "param_norm"):
    events = acc.Scalars(key)
    assert [e.step for e in events] == TRAIN_STEPS, key
    np.testing.assert_allclose([e.value for e in events], [r[key] for r in rows], rtol=1e-6,
                               err_msg=key)
  # Sample metrics under their tag, the sample figure as an image, config.json as text.
  sample = _rows(resumed, "sample")[-1]
  acc = _accumulator(resumed, "sample")
  sw = acc.Scalars(f"{sample['tag']}/sliced_wasserstein")
  assert [e.step for e in sw] == [20]
  np.testing.assert_allclose(sw[0].value, sample["sliced_wasserstein"], rtol=1e-6)
  assert acc.Tags()["images"] == [sample["tag"]]
  image = acc.Images(sample["tag"])[0]
  assert image.step == 20 and image.width > 100
  info = _accumulator(resumed, "info")
  assert "config/text_summary" in info.Tags()["tensors"]


def test_train_curves_figure(resumed):
  path = os.path.join(resumed, "figures", "train_curves.png")
  assert os.path.getsize(path) > 5000


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get_json(url):
  with urllib.request.urlopen(url, timeout=5) as r:
    return json.loads(r.read().decode())


def test_the_tensorboard_server_shows_the_loss_once_per_step(resumed):
  exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
  assert os.path.exists(exe), exe
  port = _free_port()
  base = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
      [exe, "--logdir", os.path.join(resumed, "tensorboard"), "--port", str(port),
       "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    tags, deadline = {}, time.time() + 60
    while time.time() < deadline and "loss" not in tags.get("train", {}):
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
      try:
        tags = _get_json(f"{base}/data/plugin/scalars/tags")
      except OSError:  # not listening yet
        pass
      time.sleep(0.5)
    assert "loss" in tags.get("train", {}), tags
    assert "sample" in tags and "info" in tags
    series = _get_json(f"{base}/data/plugin/scalars/scalars?run=train&tag=loss")
    assert [step for _, step, _ in series] == TRAIN_STEPS  # [wall_time, step, value]
    np.testing.assert_allclose([v for _, _, v in series],
                               [r["loss"] for r in _rows(resumed, "train")], rtol=1e-6)
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def test_report_mode_writes_report_md(resumed):
  path = main_lib.run(_tiny(), resumed, "report")
  assert path == os.path.join(resumed, "report.md")
  text = open(path).read()
  last = _rows(resumed, "train")[-1]
  sample = _rows(resumed, "sample")[-1]
  assert f"| `loss` | " in text and f"{last['loss']:.4g} |" in text
  assert "Trained to step 20 of 20" in text
  # The final sample metric next to its reference, and relative links to figures that exist.
  assert (f"| `sliced_wasserstein` | {sample['sliced_wasserstein']:.4g} | "
          f"{sample['sliced_wasserstein_floor']:.4g} (`sliced_wasserstein_floor`) |") in text
  for link in ("figures/train_curves.png", f"figures/{sample['tag']}.png", "config.json"):
    assert f"]({link})" in text and os.path.exists(os.path.join(resumed, link)), link


def test_report_mode_refuses_an_empty_workdir(tmp_path):
  with pytest.raises(WorkdirError, match=r"has no metrics\.jsonl, config\.json or sweep/"):
    main_lib.run(_tiny(), str(tmp_path / "empty"), "report")


def test_tensorboard_off_writes_no_event_files(tmp_path):
  with summaries.writer(_tiny(**{"log.tensorboard": False}), str(tmp_path)) as w:
    w.write(1, "train", {"loss": 1.0})
  assert not (tmp_path / "tensorboard").exists()
  assert wd.read_metrics(str(tmp_path))[0]["loss"] == 1.0


def test_wandb_without_the_package_is_one_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed (find_spec -> None)
  assert importlib.util.find_spec("wandb") is None
  with pytest.raises(ConfigError, match=r"config\.log\.wandb=True needs the wandb package"):
    validate.validate(_tiny(**{"log.wandb": True}), "train")


def test_a_bad_log_field_names_it():
  with pytest.raises(ConfigError, match=r"config\.log\.wandb_mode='cloud' is not allowed"):
    validate.validate(_tiny(**{"log.wandb_mode": "cloud"}), "train")


def test_wandb_sink_logs_each_split_on_its_own_step_axis(tmp_path, monkeypatch):
  """wandb is optional, so a stand-in module records what the sink asks of it."""
  import types
  calls = []

  class Run:
    def define_metric(self, name, **kw):
      calls.append(("define_metric", name, kw))

    def log(self, values):
      calls.append(("log", values))

    def finish(self):
      calls.append(("finish",))

  fake = types.ModuleType("wandb")
  fake.init = lambda **kw: calls.append(("init", kw)) or Run()
  fake.Image = lambda path: ("image", path)
  monkeypatch.setitem(sys.modules, "wandb", fake)
  config = _tiny(**{"log.wandb": True, "log.tensorboard": False})
  with summaries.writer(config, str(tmp_path)) as w:
    w.write(5, "train", {"loss": 1.5, "compute_dtype": "float32"})
    w.write(20, "sample", {"tag": "ddpm_20", "nfe": 21})
  init = calls[0][1]
  assert init["mode"] == "offline" and init["project"] == "genjax" and init["resume"] == "allow"
  assert init["config"]["data"]["name"] == "ring"
  assert ("log", {"train/loss": 1.5, "train/step": 5}) in calls
  assert ("log", {"sample/ddpm_20/nfe": 21.0, "sample/step": 20}) in calls
  assert ("define_metric", "train/*", {"step_metric": "train/step"}) in calls
  assert calls[-1] == ("finish",)


def test_tags_with_characters_tensorboard_refuses_are_renamed_silently(tmp_path):
  # "dpm_solver++_20" is not a legal TensorBoard name; we write "dpm_solverpp_20" ourselves
  # instead of letting tensorboardX warn once per scalar.
  sink = summaries.TensorBoardSink(str(tmp_path))
  sink.write(5, "sample", {"tag": "dpm_solver++_20", "nfe": 21, "fd shapes": 0.5})
  sink.close()
  acc = EventAccumulator(str(tmp_path / "sample"), size_guidance={"scalars": 0})
  acc.Reload()
  assert sorted(acc.Tags()["scalars"]) == ["dpm_solverpp_20/fd_shapes", "dpm_solverpp_20/nfe"]
  assert acc.Scalars("dpm_solverpp_20/nfe")[0].value == 21.0
