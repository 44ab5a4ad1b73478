"""What happens when things go wrong: nothing bad is saved, no run corrupts another, every
anticipated failure is one clear line (README "What happens when things go wrong")."""
import contextlib
import glob
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import quickstart
from configs.common import override
from experiments import main as main_lib
from experiments import state as state_lib
from experiments import workdir as wd
from experiments.options import CheckpointError, NonFiniteError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "--config=configs/quickstart.py:tiny"

_COMPILES = []
_COUNTING = [False]


def _on_event(event, duration, **kwargs):
  del duration, kwargs
  if _COUNTING[0] and event == "/jax/core/compile/backend_compile_duration":
    _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _cli(*args):
  """(exit code, stderr, compiles) of the command line run in this process."""
  err = io.StringIO()
  _COMPILES.clear()
  _COUNTING[0] = True
  try:
    with contextlib.redirect_stderr(err):
      code = main_lib.cli(["experiments.main", *args])
  finally:
    _COUNTING[0] = False
  return code, err.getvalue(), len(_COMPILES)


def _subprocess(*args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env)


# --- a table of bad config values and overrides: one line, the field named, nothing compiled ---

BAD = [
    (["--config.model.name=nope"], "config.model.name"),
    (["--config.train.steps=-3"], "config.train.steps"),
    (["--config.train.steps=0"], "config.train.steps"),
    (["--config.train.steps=many"], "config.train.steps"),
    (["--config.train.stepz=3"], "config.train.steps"),            # suggested
    (["--config.trian.steps=3"], "trian.steps"),
    (["--config.train=3"], "--config.train"),
    (["--config.data.batch_size=0"], "config.data.batch_size"),
    (["--config.optim.learning_rate=nan"], "config.optim.learning_rate"),
    (["--config.optim.learning_rate=inf"], "config.optim.learning_rate"),
    (["--config.optim.learning_rate=-1"], "config.optim.learning_rate"),
    (["--config.optim.ema_decay=1.0"], "config.optim.ema_decay"),
    (["--config.optim.ema_decay=-0.1"], "config.optim.ema_decay"),
    (["--config.optim.b2=1.0"], "config.optim.b2"),
    (["--config.optim.b1=1.5"], "config.optim.b1"),
    (["--config.optim.weight_decay=-1"], "config.optim.weight_decay"),
    (["--config.optim.grad_clip=nan"], "config.optim.grad_clip"),
    (["--config.optim.warmup_steps=-1"], "config.optim.warmup_steps"),
    (["--config.optim.schedule=linear"], "config.optim.schedule"),
    (["--config.diffusion.beta_max=inf"], "config.diffusion.beta_max"),
    (["--config.diffusion.beta_min=0"], "config.diffusion.beta_min"),
    (["--config.diffusion.beta_max=0.05"], "config.diffusion.beta_max"),
    (["--config.diffusion.sde=vpp"], "config.diffusion.sde"),
    (["--config.diffusion.loss=l2"], "config.diffusion.loss"),
    (["--config.diffusion.prediction=edm"], "config.diffusion.prediction"),
    (["--config.diffusion.schedule=sigmoid"], "config.diffusion.schedule"),
    (["--config.diffusion.p_uncond=1.5"], "config.diffusion.p_uncond"),
    (["--config.data.std=nan"], "config.data.std"),
    (["--config.data.radius=inf"], "config.data.radius"),
    (["--config.data.dim=1"], "config.data.dim"),
    (["--config.data.num_modes=0"], "config.data.num_modes"),
    (["--config.data.name=mnistt"], "config.data.name"),
    (["--config.sample.sampler=magic"], "config.sample.sampler"),
    (["--config.sample.steps=0"], "config.sample.steps"),
    (["--config.sample.num_samples=0"], "config.sample.num_samples"),
    (["--config.sample.options=etaa=1"], "config.sample.options"),
    (["--config.sample.sampler=ddim", "--config.sample.options=eta=-1"], "config.sample.options"),
    (["--config.sample.extra=('ddim:0',)"], "config.sample.extra"),
    (["--config.model.attention_impl=flash"], "config.model.attention_impl"),
    (["--config.model.dropout=1.5"], "config.model.dropout"),
    (["--config.model.time_embedding=random"], "config.model.time_embedding"),
    (["--config.model.ch_mult=5"], "config.model.ch_mult"),
    (["--config.train.log_every=0"], "config.train.log_every"),
    (["--config.train.keep_ckpts=0"], "config.train.keep_ckpts"),
    (["--config.train.progress=maybe"], "config.train.progress"),
    (["--config.eval.num_reference=0"], "config.eval.num_reference"),
    (["--config.guidance.kind=magic"], "config.guidance.kind"),
    (["--config.objective=gan"], "config.objective"),
    (["--config.seed=-1"], "config.seed"),
    (["--mode=evaluate", "--config.eval.likelihood.rtol=0.0"], "config.eval.likelihood.rtol"),
    (["--mode=fit"], "--mode"),
    (["--bogus=1"], "bogus"),
]


@pytest.mark.parametrize("args,field", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_fail_in_one_line_before_any_compile(tmp_path, args, field):
  code, err, compiles = _cli(TINY, f"--workdir={tmp_path}", *args)
  assert code == 2, err
  assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
  assert field in err, err
  assert compiles == 0
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("args,pattern", [
    (["--config=configs/nope.py", "--workdir=W"], r"--config='configs/nope\.py': no such file"),
    (["--config=configs/quickstart.py:huge", "--workdir=W"], r"--config=.*'huge' unknown"),
    ([TINY, "--workdir="], r"--workdir='' is not allowed"),
    ([TINY, "--workdir=/etc/passwd/run"], r"--workdir='/etc/passwd/run' cannot be written"),
    ([TINY, "--workdir=W", "--mode=sample"], r"No checkpoint in .*run --mode=train"),
    ([TINY, "--workdir=W", "--config.data.name=mnist", "--config.data.data_dir=D"],
     r"config\.data\.name='mnist'.*not prepared"),
    (["--workdir=W"], r"--config is required"),
])
def test_bad_files_and_paths_fail_in_one_line(tmp_path, args, pattern):
  args = [a.replace("=W", f"={tmp_path}/w").replace("=D", f"={tmp_path}/tfds") for a in args]
  code, err, compiles = _cli(*args)
  assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
  assert __import__("re").search(pattern, err), err
  assert compiles == 0


def test_the_real_entry_point_prints_one_line_and_debug_the_traceback(tmp_path):
  r = _subprocess(TINY, f"--workdir={tmp_path}", "--config.optim.ema_decay=1.0")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: config.optim.ema_decay=1.0")
  r = _subprocess(TINY, f"--workdir={tmp_path}", "--config.optim.ema_decay=1.0", "--debug")
  assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr


# --- the workdir lock -----------------------------------------------------------------------------

def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
  with wd.WorkdirLock(str(tmp_path)):
    code, err, _ = _cli(TINY, f"--workdir={tmp_path}")
    assert code == 2 and f"in use by another run (pid {os.getpid()})" in err, err
    assert not (tmp_path / "checkpoints").exists()
  # Released: the lock file stays, but the next run takes it.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
       "fcntl.flock(f, fcntl.LOCK_EX); f.write('4242'); f.flush(); print('held', flush=True); "
       "time.sleep(60)", str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    code, err, _ = _cli(TINY, f"--workdir={tmp_path}", "--mode=sample")
    assert code == 2 and "in use by another run (pid 4242)" in err, err
  finally:
    holder.kill()
    holder.wait()
  # The holder died: the OS released its lock.
  code, err, _ = _cli(TINY, f"--workdir={tmp_path}", "--config.train.steps=2",
                      "--config.train.ckpt_every=2", "--config.train.log_every=1")
  assert code == 0, err


def test_a_declined_save_raises(tmp_path):
  c = override(quickstart.get_config("tiny"), **{"train.steps": 10, "train.ckpt_every": 10})
  from experiments import train as train_lib
  state = train_lib.train(c, str(tmp_path))
  ck = wd.Checkpointer(str(tmp_path))
  try:
    with pytest.raises(CheckpointError, match="declined to save step 10"):
      ck.save(10, state)
  finally:
    ck.close()


# --- non-finite training is never saved -------------------------------------------------------------

def test_an_overflowing_update_is_never_saved(tmp_path):
  # A finite loss but an update that overflows: the state after the step is inf/NaN.
  code, err, _ = _cli(TINY, f"--workdir={tmp_path}", "--config.optim.learning_rate=3e38",
                      "--config.optim.weight_decay=0.5", "--config.optim.warmup_steps=0",
                      "--config.train.ckpt_every=5")
  assert code == 2 and "Traceback" not in err, err
  assert "non-finite at step 1" in err and "last good checkpoint is step None" in err, err
  assert not glob.glob(str(tmp_path / "checkpoints" / "[0-9]*"))
  assert not (tmp_path / "samples").exists()


# --- damaged checkpoints fall back ------------------------------------------------------------------

def _damage(workdir, step, kind):
  d = os.path.join(workdir, "checkpoints", str(step), "default")
  files = sorted(glob.glob(os.path.join(d, "ocdbt.process_0", "d", "*")), key=os.path.getsize)
  big = files[-1]
  if kind == "truncated":
    with open(big, "r+b") as f:
      f.truncate(os.path.getsize(big) // 2)
  elif kind == "garbled":
    n = os.path.getsize(big)
    with open(big, "r+b") as f:
      f.seek(n // 3)
      f.write(np.random.default_rng(0).bytes(max(64, n // 3)))
  elif kind == "manifest":
    for m in glob.glob(os.path.join(d, "**", "manifest.ocdbt"), recursive=True):
      with open(m, "r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 40)
  elif kind == "metadata":
    os.remove(os.path.join(d, "_METADATA"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run with checkpoints at steps 10 and 20, and its final parameters."""
  from experiments import train as train_lib
  workdir = str(tmp_path_factory.mktemp("trained"))
  state = train_lib.train(quickstart.get_config("tiny"), workdir)
  return workdir, [np.asarray(p) for p in jax.tree.leaves(state.params)]


@pytest.mark.parametrize("kind", ["truncated", "garbled", "manifest", "metadata"])
def test_a_damaged_latest_checkpoint_falls_back(tmp_path, trained, kind):
  import shutil
  src, final = trained
  workdir = str(tmp_path / "w")
  shutil.copytree(src, workdir)
  _damage(workdir, 20, kind)
  # Reading modes take the newest good step, with a warning naming the damaged one.
  code, err, _ = _cli(TINY, f"--workdir={workdir}", "--mode=sample", "--config.sample.tag=t")
  assert code == 0, err
  rows = [r for r in wd.read_metrics(workdir) if r["split"] == "sample" and r["tag"] == "t"]
  assert [r["step"] for r in rows] == [10]
  # Training moves the damaged step aside, resumes at 10 and ends where the clean run ended.
  code, err, _ = _cli(TINY, f"--workdir={workdir}")
  assert code == 0, err
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged"))
  ck = wd.Checkpointer(workdir)
  try:
    assert ck.all_steps() == [10, 20]
    restored, step = ck.restore_newest_good(
        state_lib.create_state(quickstart.get_config("tiny"), *_objective_and_spec(),
                               jax.random.PRNGKey(0)))
  finally:
    ck.close()
  assert step == 20
  for a, b in zip(final, jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(a, np.asarray(b))  # bitwise
  train_steps = [r["step"] for r in wd.read_metrics(workdir) if r["split"] == "train"]
  assert len(train_steps) == len(set(train_steps))  # each step logged once


def _objective_and_spec():
  from experiments import builders, data
  c = quickstart.get_config("tiny")
  spec = data.build_data_spec(c)
  return builders.build_objective(c, spec), spec


def test_every_kept_step_damaged_is_one_clear_error(tmp_path, trained):
  import shutil
  workdir = str(tmp_path / "w")
  shutil.copytree(trained[0], workdir)
  _damage(workdir, 20, "truncated")
  _damage(workdir, 10, "manifest")
  code, err, _ = _cli(TINY, f"--workdir={workdir}", "--mode=sample")
  assert code == 2 and "Traceback" not in err, err
  assert "no kept checkpoint" in err and "step 20" in err and "step 10" in err


# --- a resume whose config changed the state's structure ------------------------------------------

def test_a_changed_model_is_refused_naming_the_field_and_grad_clip_may_change(tmp_path, trained):
  import shutil
  workdir = str(tmp_path / "w")
  shutil.copytree(trained[0], workdir)
  code, err, compiles = _cli(TINY, f"--workdir={workdir}", "--config.model.hidden=48",
                             "--config.train.steps=30")
  assert code == 2 and "Traceback" not in err, err
  assert "different train state" in err and "model.hidden: 32 -> 48" in err, err
  # Toggling gradient clipping keeps the optimizer state's structure: the run resumes.
  code, err, _ = _cli(TINY, f"--workdir={workdir}", "--config.optim.grad_clip=0.0",
                      "--config.train.steps=30")
  assert code == 0, err
  assert wd.read_metrics(workdir)[-1]["step"] == 30


# --- kill -9 inside a checkpoint write, then resume -------------------------------------------------

def test_kill_during_a_checkpoint_write_then_resume_bitwise(tmp_path):
  args = [TINY, "--config.train.steps=60", "--config.train.ckpt_every=3",
          "--config.train.log_every=3", "--config.model.hidden=256", "--config.model.depth=3",
          "--config.sample.num_samples=16", "--config.sample.batch_size=16",
          "--config.eval.num_reference=16"]
  clean = str(tmp_path / "clean")
  assert _subprocess(*args, f"--workdir={clean}").returncode == 0
  killed = str(tmp_path / "killed")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  p = subprocess.Popen([sys.executable, "-m", "experiments.main", *args, f"--workdir={killed}"],
                       cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckdir = os.path.join(killed, "checkpoints")
  in_write, t0 = False, time.time()
  while p.poll() is None and time.time() - t0 < 240:
    names = os.listdir(ckdir) if os.path.isdir(ckdir) else []
    steps = [int(n) for n in names if n.isdigit()]
    if any("tmp" in n for n in names) and steps and max(steps) >= 9:
      in_write = True
      break
    time.sleep(0.0005)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert in_write, "never saw a checkpoint being written"
  r = _subprocess(*args, f"--workdir={killed}")
  assert r.returncode == 0, r.stderr[-2000:]

  def final(workdir):
    ck = wd.Checkpointer(workdir)
    try:
      c = override(quickstart.get_config("tiny"), **{"model.hidden": 256, "model.depth": 3})
      from experiments import builders, data
      spec = data.build_data_spec(c)
      state = state_lib.create_state(c, builders.build_objective(c, spec), spec,
                                     jax.random.PRNGKey(0))
      restored, step = ck.restore_newest_good(state)
      return step, restored
    finally:
      ck.close()

  (s1, a), (s2, b) = final(clean), final(killed)
  assert s1 == s2 == 60
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  steps = [r["step"] for r in wd.read_metrics(killed) if r["split"] == "train"]
  assert steps == sorted(set(steps)) and steps[-1] == 60  # each step once after the resume
  assert [r["step"] for r in wd.read_metrics(killed) if r["split"] == "info"] == [0]
