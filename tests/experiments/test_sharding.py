"""Many devices and many hosts (experiments/mesh.py, research/sharding.py).

Simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) in subprocesses
(tests/experiments/sharding_worker.py), compared with 1-device runs in this process:
  - 8 devices: the quickstart and digits jobs shard the batch (and, with mesh.fsdp, the state)
    and give the 1-device losses; the UNet's attention equals the unsharded op, no all-gather
  - a run checkpointed on 8 devices resumes on 2 and on 1 with the uninterrupted losses
  - two processes x 2 devices (jax.distributed over 127.0.0.1, gloo) train like one process
    with 4 devices: one metrics.jsonl, one checkpoint directory, the same final params
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import mesh as mesh_lib
from experiments import workdir as wd
from experiments.options import ConfigError
from experiments.train import train

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "experiments" / "sharding_worker.py"
QS = "configs/quickstart.py:tiny"
DIGITS = "configs/images/digits_ddpm.py:tiny"
TIMEOUT = 300


def _env(devices: int):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT)
  return env


def _launch(out, jobs, devices, extra=()):
  return subprocess.Popen([sys.executable, str(WORKER), str(out), *map(json.dumps, jobs),
                           *extra], env=_env(devices), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait(proc):
  try:
    out, _ = proc.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  assert proc.returncode == 0, out[-3000:]
  return out


def _run(tmp_path, jobs, devices, name="out"):
  out = tmp_path / f"{name}.json"
  _wait(_launch(out, jobs, devices))
  return json.loads(out.read_text())


def _config(path_arg, overrides):
  """The config the worker builds for the same job (its loader, in this process)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("sharding_worker", WORKER)
  worker = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(worker)
  return worker._config(path_arg, overrides)  # pylint: disable=protected-access


def _losses(workdir):
  return {r["step"]: r["loss"] for r in wd.read_metrics(str(workdir)) if r["split"] == "train"}


def _max_rel(a: dict, b: dict, steps=None):
  steps = sorted(set(a) & set(b)) if steps is None else steps
  assert steps, (a, b)
  return max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-6) for s in steps)


QS_50 = {"train.steps": 50, "train.log_every": 5, "train.ckpt_every": 50}
DIGITS_50 = {"train.steps": 50, "train.log_every": 5, "train.ckpt_every": 50,
             "data.batch_size": 16}


def test_mesh_sizes_and_batch_errors_name_the_field():
  from ml_collections import ConfigDict
  c = ConfigDict({"mesh": {"data": -1, "fsdp": 2}, "data": {"batch_size": 12}})
  assert mesh_lib.mesh_shape(c, 8) == (4, 2)
  c.mesh.fsdp = 3
  with pytest.raises(ConfigError, match="config.mesh"):
    mesh_lib.mesh_shape(c, 8)
  c.mesh.data, c.mesh.fsdp = 2, 2
  with pytest.raises(ConfigError, match="needs 4 devices; 8 are visible"):
    mesh_lib.mesh_shape(c, 8)
  c.mesh.data = 0
  with pytest.raises(ConfigError, match=r"config.mesh.data=0"):
    mesh_lib.mesh_shape(c, 8)
  c.mesh.data, c.mesh.fsdp = -1, -1
  with pytest.raises(ConfigError, match="at most one"):
    mesh_lib.mesh_shape(c, 8)
  # A global batch the batch axes do not divide: refused before anything compiles.
  import types
  with pytest.raises(ConfigError, match=r"config.data.batch_size=12 .*a multiple of 8"):
    mesh_lib.check_batch(c, types.SimpleNamespace(shape={"data": 4, "fsdp": 2}))
  mesh_lib.check_batch(c, types.SimpleNamespace(shape={"data": 4, "fsdp": 1}))


def test_eight_devices_train_like_one(tmp_path):
  """quickstart + digits on 8 devices (batch over data; fsdp=2 shards the params) vs 1."""
  jobs = [{"kind": "train", "config": QS, "workdir": str(tmp_path / "qs8"), "overrides": QS_50,
           "name": "qs"},
          {"kind": "train", "config": QS, "workdir": str(tmp_path / "qs8f"),
           "overrides": {**QS_50, "mesh.data": 4, "mesh.fsdp": 2, "model.hidden": 64},
           "name": "qs_fsdp"},
          {"kind": "train", "config": DIGITS, "workdir": str(tmp_path / "dg8"),
           "overrides": DIGITS_50, "name": "digits"},
          {"kind": "attention", "name": "attn"}]
  r = _run(tmp_path, jobs, devices=8)

  # The compiled step's input shardings: the batch split over both batch axes on 8 devices.
  assert r["qs"]["num_devices"] == 8 and r["digits"]["num_devices"] == 8
  assert set(r["qs"]["batch_spec"].values()) == {"(('data', 'fsdp'),)"}
  assert set(r["digits"]["batch_spec"].values()) == {"(('data', 'fsdp'),)"}
  assert r["qs"]["param_specs"] == ["()"]  # replicated over data
  assert any("fsdp" in s for s in r["qs_fsdp"]["param_specs"]), r["qs_fsdp"]["param_specs"]
  info = r["qs"]["info"][0]
  assert (info["num_devices"], info["num_processes"], info["mesh_data"], info["mesh_fsdp"],
          info["compute_dtype"]) == (8, 1, 8, 1, "float32")

  # The same global batches on one device give the same losses.
  for name, cfg, over in (("qs", QS, QS_50), ("digits", DIGITS, DIGITS_50)):
    one = tmp_path / f"{name}1"
    train(_config(cfg, over), str(one))
    eight = {int(k): v for k, v in r[name]["losses"].items()}
    assert len(eight) == 10
    print(f"{name}: 8 vs 1 device losses, max rel diff {_max_rel(eight, _losses(one)):.2e}")
    assert _max_rel(eight, _losses(one)) < 2e-4, (name, eight, _losses(one))
  one = tmp_path / "qsf1"
  train(_config(QS, {**QS_50, "model.hidden": 64}), str(one))
  fsdp = {int(k): v for k, v in r["qs_fsdp"]["losses"].items()}
  print(f"qs fsdp=2 x data=4 vs 1 device: max rel diff {_max_rel(fsdp, _losses(one)):.2e}")
  assert _max_rel(fsdp, _losses(one)) < 2e-4

  # The UNet's (Pallas) attention under the 8-device mesh: per shard, no gather of q, k, v.
  a = r["attn"]
  print(f"attention under the mesh: max abs diff {a['max_abs_diff']:.2e} (scale "
        f"{a['scale']:.2f}), all-gathers {a['all_gathers']}")
  assert a["max_abs_diff"] <= 1e-5 * a["scale"], a
  assert a["all_gathers"] == 0, a
  assert "data" in a["out_spec"], a


def test_resume_on_fewer_devices_continues_the_same_losses(tmp_path):
  """Checkpointed on 8 devices at step 30, resumed on 2 and on 1: the losses of 60 steps."""
  over = {**QS_50, "train.steps": 30, "train.ckpt_every": 10, "optim.schedule": "constant"}
  _run(tmp_path, [{"kind": "train", "config": QS, "workdir": str(tmp_path / "a"),
                   "overrides": over}], devices=8, name="a")
  assert wd.Checkpointer(str(tmp_path / "a")).latest_step() == 30
  for d in ("on2", "on1"):
    shutil.copytree(tmp_path / "a", tmp_path / d)
  cont = {**over, "train.steps": 60}
  r2 = _run(tmp_path, [{"kind": "train", "config": QS, "workdir": str(tmp_path / "on2"),
                        "overrides": cont, "name": "on2"}], devices=2, name="b")
  assert r2["on2"]["num_devices"] == 2
  train(_config(QS, cont), str(tmp_path / "on1"))
  train(_config(QS, cont), str(tmp_path / "straight"))
  straight = _losses(tmp_path / "straight")
  after = [s for s in straight if s > 30]
  assert after == [35, 40, 45, 50, 55, 60]
  on2 = {int(k): v for k, v in r2["on2"]["losses"].items()}
  print(f"resume 8 -> 2: max rel diff {_max_rel(on2, straight, after):.2e}; 8 -> 1: "
        f"{_max_rel(_losses(tmp_path / 'on1'), straight, after):.2e}")
  assert _max_rel(on2, straight, after) < 2e-4
  assert _max_rel(_losses(tmp_path / "on1"), straight, after) < 2e-4
  # Each step once in metrics.jsonl after the resume.
  steps = [r["step"] for r in wd.read_metrics(str(tmp_path / "on2")) if r["split"] == "train"]
  assert steps == sorted(set(steps))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one_process(tmp_path):
  """2 processes x 2 devices (jax.distributed, 127.0.0.1) vs 1 process x 4 devices."""
  job = {"kind": "train", "config": QS, "workdir": str(tmp_path / "multi"), "overrides": QS_50,
         "name": "multi"}
  addr = f"127.0.0.1:{_free_port()}"
  procs = [_launch(tmp_path / "multi.json", [job], 2,
                   (f"--coordinator_address={addr}", "--num_processes=2", f"--process_id={i}"))
           for i in range(2)]
  for p in procs:
    _wait(p)
  single = _run(tmp_path, [{**job, "workdir": str(tmp_path / "single"), "name": "single"}],
                devices=4, name="single")["single"]
  multi = json.loads((tmp_path / "multi.json").read_text())["multi"]
  assert (multi["num_processes"], multi["num_devices"]) == (2, 4)
  # One metrics.jsonl (process 0 writes) with each step once, one checkpoint directory.
  rows = [r for r in wd.read_metrics(str(tmp_path / "multi")) if r["split"] == "train"]
  assert [r["step"] for r in rows] == list(range(5, 55, 5))
  assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["50"]
  assert _max_rel({int(k): v for k, v in multi["losses"].items()},
                  {int(k): v for k, v in single["losses"].items()}) < 1e-5
  worst = max(float(np.abs(np.asarray(multi["params"][k]) - np.asarray(v)).max())
              for k, v in single["params"].items())
  print(f"2 processes x 2 vs 1 x 4 devices: final params max abs diff {worst:.2e}")
  for k, v in single["params"].items():
    np.testing.assert_allclose(np.asarray(multi["params"][k]), np.asarray(v), rtol=1e-5,
                               atol=1e-6, err_msg=k)
