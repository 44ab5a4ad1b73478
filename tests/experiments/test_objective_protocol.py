"""Every objective the builder table makes implements the one protocol (research/objective.py),
and the runner's questions are answered by the object, not by config.objective."""
import jax
import numpy as np
import pytest

from configs import quickstart
from configs.flows import ring as ring_flows
from experiments import builders
from experiments import data as data_lib
from experiments.options import ConfigError, check_sample_requests
from configs.common import override
from research.objective import Objective


@pytest.mark.parametrize("config,samplers,likelihood", [
    (quickstart.get_config("tiny"), True, True),
    (ring_flows.get_config("kind=realnvp,tiny"), False, True),
    (ring_flows.get_config("kind=fm,tiny"), True, True),
], ids=["diffusion", "flow", "flow_matching"])
def test_objectives_implement_the_protocol(config, samplers, likelihood):
  spec = data_lib.build_data_spec(config)
  obj = builders.build_objective(config, spec)
  assert isinstance(obj, Objective)
  assert obj.data_shape == spec.dims
  assert bool(obj.sampler_names) == samplers and obj.has_likelihood == likelihood
  rng = jax.random.PRNGKey(0)
  batch = next(data_lib.train_batches(config, spec, 0))
  params = obj.init(rng, batch)
  loss, metrics = obj.loss(params, batch, rng)
  assert np.isfinite(float(loss)) and "loss" in metrics
  opts = {"sampler": "ode_euler", "denoise": False} if samplers else {"temperature": 0.5}
  obj.check_options(opts, 4)
  x, info = obj.sample(params, rng, 8, steps=4, **opts) if samplers else obj.sample(
      params, rng, 8, **opts)
  assert x.shape == (8, *spec.dims)
  logp, info = obj.log_likelihood(params, batch["x"][:4], rng, estimator="exact", rtol=1e-3,
                                  atol=1e-3)
  assert logp.shape == (4,) and info["method"] in ("probability_flow_ode", "exact_density")
  with pytest.raises(ValueError):
    obj.check_options({"bogus": 1, **opts}, 4)


def test_bad_sampler_options_name_the_field_for_every_objective():
  for config in (quickstart.get_config("tiny"), ring_flows.get_config("kind=fm,tiny")):
    override(config, **{"sample.options": "etaa=1"})
    obj = builders.build_objective(config, data_lib.build_data_spec(config))
    with pytest.raises(ConfigError, match=r"config\.sample\.options='etaa=1'.*'etaa'"):
      check_sample_requests(config, obj)
