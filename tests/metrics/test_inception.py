"""FID Inception: layer names/shapes, weight loading, blocks against a numpy port of the torch
layers (NCHW, OIHW), preprocessing, features and FID. No real weights exist here: every
array below is random with pytorch-fid's names and shapes."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl

from experiments import convert_inception_weights as convert
from research.metrics import inception as inc

# --- a numpy port of the torch layers (NCHW activations, OIHW weights) --------------------------


def _conv(x, w, stride=(1, 1), pad=(0, 0)):
  x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
  kh, kw = w.shape[2:]
  win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
  win = win[:, :, ::stride[0], ::stride[1]]  # [N, I, Ho, Wo, kh, kw]
  return np.einsum("nihwab,oiab->nohw", win, w, optimize=True)


def _basic(x, sd, prefix, stride=(1, 1), pad=(0, 0)):
  y = _conv(x, sd[prefix + ".conv.weight"], stride, pad)
  c = lambda k: sd[f"{prefix}.bn.{k}"][None, :, None, None]
  y = (y - c("running_mean")) / np.sqrt(c("running_var") + 1e-3) * c("weight") + c("bias")
  return np.maximum(y, 0)


def _pool3x3_same(x, kind):
  n, ch, h, w = x.shape
  out = np.empty_like(x)
  for i in range(h):
    for j in range(w):
      win = x[:, :, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]  # real pixels only
      out[:, :, i, j] = win.mean((2, 3)) if kind == "avg" else win.max((2, 3))
  return out


def _mixed_a(x, sd, p):
  b1 = _basic(x, sd, p + ".branch1x1")
  b5 = _basic(_basic(x, sd, p + ".branch5x5_1"), sd, p + ".branch5x5_2", pad=(2, 2))
  b3 = _basic(x, sd, p + ".branch3x3dbl_1")
  b3 = _basic(b3, sd, p + ".branch3x3dbl_2", pad=(1, 1))
  b3 = _basic(b3, sd, p + ".branch3x3dbl_3", pad=(1, 1))
  bp = _basic(_pool3x3_same(x, "avg"), sd, p + ".branch_pool")
  return np.concatenate([b1, b5, b3, bp], 1)


def _mixed_e(x, sd, p, pool):
  b1 = _basic(x, sd, p + ".branch1x1")
  b3 = _basic(x, sd, p + ".branch3x3_1")
  b3 = np.concatenate([_basic(b3, sd, p + ".branch3x3_2a", pad=(0, 1)),
                       _basic(b3, sd, p + ".branch3x3_2b", pad=(1, 0))], 1)
  bd = _basic(x, sd, p + ".branch3x3dbl_1")
  bd = _basic(bd, sd, p + ".branch3x3dbl_2", pad=(1, 1))
  bd = np.concatenate([_basic(bd, sd, p + ".branch3x3dbl_3a", pad=(0, 1)),
                       _basic(bd, sd, p + ".branch3x3dbl_3b", pad=(1, 0))], 1)
  bp = _basic(_pool3x3_same(x, pool), sd, p + ".branch_pool")
  return np.concatenate([b1, b3, bd, bp], 1)


def _torch_bilinear(x, size):
  """F.interpolate(x, (size, size), mode="bilinear", align_corners=False), NHWC, numpy."""
  def axis_weights(n_in):
    src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((size, n_in))
    m[np.arange(size), i0] += 1 - lam
    m[np.arange(size), i1] += lam
    return m
  mh, mw = axis_weights(x.shape[1]), axis_weights(x.shape[2])
  return np.einsum("ph,nhwc,qw->npqc", mh, x, mw)


# --- fixtures -----------------------------------------------------------------------------------


def _random_state_dict(seed=0):
  """pytorch-fid-named random arrays; He-scaled convs keep 94 layers' activations finite."""
  rng = np.random.default_rng(seed)
  sd = {}
  for k, shape in inc.torch_state_dict_shapes().items():
    if k.endswith("conv.weight"):
      sd[k] = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif k.endswith(("running_var", "bn.weight")):
      sd[k] = rng.uniform(0.5, 1.5, shape)
    else:
      sd[k] = 0.1 * rng.standard_normal(shape)
    sd[k] = sd[k].astype(np.float32)
  return sd


@pytest.fixture(scope="module")
def state_dict():
  return _random_state_dict()


@pytest.fixture(scope="module")
def weights_path(state_dict, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "fid_inception.npz")
  extra = {"fc.weight": np.zeros((1008, 2048), np.float32), "fc.bias": np.zeros(1008, np.float32),
           "Conv2d_1a_3x3.bn.num_batches_tracked": np.zeros((), np.int64)}
  np.savez(path, **state_dict, **extra)  # what the converter would write, plus ignored extras
  return path


@pytest.fixture(scope="module")
def variables(weights_path):
  return inc.load_fid_inception_params(weights_path)


# --- names, shapes, loading ---------------------------------------------------------------------


def test_pytorch_fid_names_and_shapes():
  shapes = inc.torch_state_dict_shapes()
  known = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
           "Conv2d_1a_3x3.bn.running_mean": (32,),
           "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
           "Conv2d_4a_3x3.bn.running_var": (192,),
           "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
           "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
           "Mixed_5d.branch5x5_1.conv.weight": (48, 288, 1, 1),
           "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
           "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
           "Mixed_6e.branch7x7dbl_2.conv.weight": (192, 192, 7, 1),
           "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
           "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
           "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
           "Mixed_7c.branch_pool.bn.bias": (192,)}
  for name, shape in known.items():
    assert shapes[name] == shape, name
  assert sum(k.endswith(".conv.weight") for k in shapes) == 94  # BasicConv2d layers, no aux
  assert len(shapes) == 94 * 5
  # torchvision's inception_v3 has 27,161,264 parameters (running stats are buffers); it adds
  # InceptionAux (768->128 1x1, 128->768 5x5, each + BN weight/bias, fc 768->1000) and fc.
  ours = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(("_mean", "_var")))
  aux = 768 * 128 + 2 * 128 + 128 * 768 * 25 + 2 * 768 + 768 * 1000 + 1000
  assert ours + aux + (2048 * 1000 + 1000) == 27_161_264


def test_stage_shapes_match_torchvision_comments(variables):
  x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
  out, state = jax.eval_shape(
      lambda v, x: inc.FIDInceptionV3().apply(v, x, capture_intermediates=True), variables, x)
  inter = state["intermediates"]
  expected = {"Conv2d_1a_3x3": (149, 149, 32), "Conv2d_2a_3x3": (147, 147, 32),
              "Conv2d_2b_3x3": (147, 147, 64), "Conv2d_3b_1x1": (73, 73, 80),
              "Conv2d_4a_3x3": (71, 71, 192), "Mixed_5b": (35, 35, 256),
              "Mixed_5d": (35, 35, 288), "Mixed_6a": (17, 17, 768), "Mixed_6e": (17, 17, 768),
              "Mixed_7a": (8, 8, 1280), "Mixed_7b": (8, 8, 2048), "Mixed_7c": (8, 8, 2048)}
  for name, hwc in expected.items():
    assert inter[name]["__call__"][0].shape == (1,) + hwc, name
  assert out.shape == (1, 2048)


def test_loader_round_trip(state_dict, variables):
  template = jax.eval_shape(inc.FIDInceptionV3().init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 299, 299, 3)))
  assert jax.tree.structure(template) == jax.tree.structure(variables)
  assert jax.tree.map(lambda s: s.shape, template) == jax.tree.map(np.shape, variables)
  p, bs = variables["params"], variables["batch_stats"]
  w = state_dict["Mixed_6b.branch7x7_2.conv.weight"]  # (O, I, 1, 7)
  np.testing.assert_array_equal(p["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
                                w.transpose(2, 3, 1, 0))
  assert p["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"].shape == (1, 7, 128, 128)
  for name, path, _ in inc._flax_layout():  # every array, through the inverse mapping
    got = variables
    for k in path:
      got = got[k]
    ref = state_dict[name]
    np.testing.assert_array_equal(got, ref.transpose(2, 3, 1, 0) if ref.ndim == 4 else ref)
  np.testing.assert_array_equal(bs["Conv2d_1a_3x3"]["bn"]["var"],
                                state_dict["Conv2d_1a_3x3.bn.running_var"])


def test_loader_errors_name_the_problem(state_dict, tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    inc.load_fid_inception_params(tmp_path / "nope.npz")
  bad = tmp_path / "not_npz.npz"
  bad.write_bytes(b"PK\x03\x04 definitely not a zip")
  with pytest.raises(ValueError, match="not a readable .npz"):
    inc.load_fid_inception_params(bad)

  missing = dict(state_dict)
  del missing["Mixed_6c.branch7x7_1.bn.running_var"]
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(ValueError, match=r"missing 1 of the 470.*Mixed_6c\.branch7x7_1\.bn\."
                     r"running_var"):
    inc.load_fid_inception_params(tmp_path / "missing.npz")

  wrong = dict(state_dict)
  wrong["Mixed_5b.branch_pool.conv.weight"] = np.zeros((64, 192, 1, 1), np.float32)
  np.savez(tmp_path / "wrong.npz", **wrong)
  with pytest.raises(ValueError, match=r"Mixed_5b\.branch_pool\.conv\.weight has shape "
                     r"\(64, 192, 1, 1\), expected \(32, 192, 1, 1\)"):
    inc.load_fid_inception_params(tmp_path / "wrong.npz")

  aux = dict(state_dict, **{"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1))})
  with pytest.raises(ValueError, match="unexpected.*torchvision.*AuxLogits.conv0.conv.weight"):
    inc.variables_from_state_dict(aux)


# --- layers against the numpy port of torch -----------------------------------------------------


def _sub(variables, *path):
  out = {}
  for col in ("params", "batch_stats"):
    node = variables[col]
    for k in path:
      node = node[k]
    out[col] = node
  return out


@pytest.mark.parametrize("prefix,kernel,stride,pad,cin", [
    ("Conv2d_1a_3x3", 3, 2, 0, 3),  # stem: stride 2, no padding
    ("Mixed_6b.branch7x7_2", (1, 7), 1, (0, 3), 128),  # non-square kernel pins H vs W
])
def test_conv_bn_relu_matches_numpy(state_dict, variables, prefix, kernel, stride, pad, cin):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, cin, 9, 11)).astype(np.float32)  # NCHW, H != W
  ref = _basic(x, state_dict, prefix, inc._pair(stride), inc._pair(pad))
  feats = state_dict[prefix + ".conv.weight"].shape[0]
  block = inc.BasicConv2d(feats, kernel, stride, pad)
  got = block.apply(_sub(variables, *prefix.split(".")), x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref, rtol=1e-4, atol=1e-5)
  assert (ref > 0).mean() > 0.2  # the comparison is not between two all-zero ReLU outputs


def test_avg_pool_does_not_count_padding():
  rng = np.random.default_rng(2)
  x = rng.uniform(1, 2, (1, 5, 4, 3)).astype(np.float32)  # NHWC
  got = np.asarray(inc.avg_pool_3x3_exclude_pad(x))
  ref = _pool3x3_same(x.transpose(0, 3, 1, 2), "avg").transpose(0, 2, 3, 1)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  np.testing.assert_allclose(got[0, 0, 0], x[0, :2, :2].mean((0, 1)), rtol=1e-6)  # corner: 4
  np.testing.assert_allclose(got[0, 0, 1], x[0, :2, :3].mean((0, 1)), rtol=1e-6)  # edge: 6
  assert not np.allclose(got[0, 0, 0], x[0, :2, :2].sum((0, 1)) / 9)  # count_include_pad=True
  np.testing.assert_allclose(got[0, 2, 1], x[0, 1:4, :3].mean((0, 1)), rtol=1e-6)  # interior
  neg = -x  # max pool: padding never wins, even when every real value is negative
  np.testing.assert_allclose(np.asarray(inc.max_pool_3x3_same(neg))[0, 0, 0],
                             neg[0, :2, :2].max((0, 1)), rtol=1e-6)


def test_mixed_5b_matches_numpy(state_dict, variables):
  x = np.random.default_rng(3).standard_normal((1, 192, 6, 5)).astype(np.float32)
  got = inc.InceptionA(32).apply(_sub(variables, "Mixed_5b"), x.transpose(0, 2, 3, 1))
  ref = _mixed_a(x, state_dict, "Mixed_5b")
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref, rtol=1e-4, atol=1e-4)


def test_mixed_7c_max_pool_branch_matches_numpy(state_dict, variables):
  x = np.random.default_rng(4).standard_normal((1, 2048, 4, 3)).astype(np.float32)
  got = np.asarray(inc.InceptionE("max").apply(_sub(variables, "Mixed_7c"),
                                               x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, _mixed_e(x, state_dict, "Mixed_7c", "max"), rtol=1e-4,
                             atol=1e-4)
  avg = _mixed_e(x, state_dict, "Mixed_7c", "avg")  # the pool kind is visible in the output
  assert np.abs(got[:, -192:] - avg[:, -192:]).max() > 1e-2


def test_network_wires_the_fid_blocks(variables):
  """Block kinds the shapes cannot show: Mixed_7b pools by average, Mixed_7c by max; pool3 is
  the spatial mean. A 107x107 input leaves Mixed_7c a 2x2 grid, where the two differ."""
  x = np.random.default_rng(8).uniform(-1, 1, (1, 107, 107, 3)).astype(np.float32)
  feats, state = jax.jit(lambda v, x: inc.FIDInceptionV3().apply(
      v, x, capture_intermediates=True))(variables, x)
  inter = jax.tree.map(np.asarray, state["intermediates"])
  out = lambda name: inter[name]["__call__"][0]
  assert out("Mixed_7a").shape == (1, 2, 2, 1280)
  for name, pool, prev in (("Mixed_7b", "avg", "Mixed_7a"), ("Mixed_7c", "max", "Mixed_7b")):
    ref = inc.InceptionE(pool).apply(_sub(variables, name), out(prev))
    np.testing.assert_allclose(out(name), ref, rtol=1e-5, atol=1e-5)
  other = inc.InceptionE("avg").apply(_sub(variables, "Mixed_7c"), out("Mixed_7b"))
  assert np.abs(np.asarray(other) - out("Mixed_7c")).max() > 1e-2
  np.testing.assert_allclose(feats, out("Mixed_7c").mean((1, 2)), rtol=1e-5, atol=1e-6)


# --- preprocessing, features, FID ---------------------------------------------------------------


@pytest.mark.parametrize("n_in", [7, 13, 600])
def test_resize_matches_torch_bilinear_align_corners_false(n_in):
  x = np.random.default_rng(n_in).uniform(0, 1, (1, n_in, n_in, 2)).astype(np.float32)
  size = 299 if n_in < 100 else 5  # upsampling, and downsampling without anti-aliasing
  got = np.asarray(inc.resize_bilinear(x, size))
  np.testing.assert_allclose(got, _torch_bilinear(x, size), rtol=1e-5, atol=1e-6)


def test_preprocess_quantizes_clips_and_repeats_gray():
  rng = np.random.default_rng(5)
  x = rng.uniform(-1.2, 1.2, (1, 299, 299, 1)).astype(np.float32)
  got = np.asarray(inc.preprocess(x))  # 299 -> 299 is the identity resize
  u8 = np.round((np.clip(x, -1, 1) + 1) * 127.5)  # pipeline.from_model_space
  np.testing.assert_allclose(got, np.repeat(2 * u8 / 255 - 1, 3, -1), atol=1e-6)
  assert got.min() >= -1 and got.max() <= 1


def test_features_shapes_gray_and_batching(variables):
  rng = np.random.default_rng(6)
  small = rng.uniform(-1, 1, (3, 16, 16, 1)).astype(np.float32)
  f_gray = inc.inception_features(variables, small, batch_size=2)  # 2 batches, last padded
  assert f_gray.shape == (3, 2048) and f_gray.dtype == np.float32
  assert np.all(np.isfinite(f_gray)) and np.all(f_gray >= 0)  # mean of ReLU outputs
  f_rgb = inc.inception_features(variables, np.repeat(small[:2], 3, -1), batch_size=2)
  np.testing.assert_allclose(f_rgb, f_gray[:2], rtol=1e-5, atol=1e-6)
  assert np.abs(f_gray[0] - f_gray[1]).max() > 1e-3  # different images, different features
  big = rng.uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
  f_big = inc.inception_features(variables, big, batch_size=2)
  assert f_big.shape == (2, 2048) and np.all(np.isfinite(f_big))


def test_fid_and_input_errors(variables, weights_path):
  rng = np.random.default_rng(7)
  a = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  b = np.clip(a[::-1] + 0.5, -1, 1)
  # With 2 images per set each covariance is rank one, S = u u^T with u = (f_1 - f_2) / sqrt(2),
  # so FD = |mu_a - mu_b|^2 + |u|^2 + |v|^2 - 2 |u . v| in closed form. One FD at D = 2048 is
  # two float64 2048x2048 eigendecompositions: ~2 s on one BLAS thread, but 10-20 s when
  # OpenBLAS spins two threads on two busy cores, hence the limit (threadpoolctl comes with
  # scikit-learn).
  fa = inc.inception_features(variables, a, batch_size=2).astype(np.float64)
  fb = inc.inception_features(variables, b, batch_size=2).astype(np.float64)
  u, v = (fa[0] - fa[1]) / np.sqrt(2), (fb[0] - fb[1]) / np.sqrt(2)
  expected = np.sum((fa.mean(0) - fb.mean(0))**2) + u @ u + v @ v - 2 * abs(u @ v)
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    got = inc.fid(a, b, weights_path, batch_size=2)
  assert expected > 1e-2
  assert got == pytest.approx(expected, rel=1e-3)
  with pytest.raises(ValueError, match="images must be .*C = 1.*got shape"):
    inc.inception_features(variables, a[..., :2])
  with pytest.raises(ValueError, match="float in .*uint8"):
    inc.inception_features(variables, np.zeros((1, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="batch_size=0"):
    inc.inception_features(variables, a, batch_size=0)
  with pytest.raises(ValueError, match="samples must hold at least 2"):
    inc.fid(a[:1], a, variables)
  with pytest.raises(ValueError, match="weights must be a path"):
    inc.fid(a, a, {"params": {}})


# --- the converter (torch is not needed for these) ----------------------------------------------


def test_converter_writes_what_the_loader_reads(state_dict, tmp_path):
  sd = dict(state_dict, **{"fc.weight": np.ones((1008, 2048), np.float32)})
  out = str(tmp_path / "sub" / "w.npz")
  written = convert.convert_state_dict(sd, out)
  assert len(written) == 470 and "fc.weight" not in written
  with np.load(out) as data:
    np.testing.assert_array_equal(data["Mixed_7c.branch_pool.conv.weight"],
                                  state_dict["Mixed_7c.branch_pool.conv.weight"])
  bad = dict(state_dict)
  del bad["Conv2d_2a_3x3.conv.weight"]
  with pytest.raises(ValueError, match="Conv2d_2a_3x3.conv.weight"):
    convert.convert_state_dict(bad, str(tmp_path / "bad.npz"))
  assert not os.path.exists(tmp_path / "bad.npz")


def test_converter_cli_errors_without_input_or_torch(tmp_path, monkeypatch, capsys):
  with pytest.raises(SystemExit, match="does not exist"):
    convert.main([str(tmp_path / "missing.pth"), str(tmp_path / "o.npz")])
  pth = tmp_path / "fake.pth"
  pth.write_bytes(b"not weights")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(SystemExit, match="needs PyTorch"):
    convert.main([str(pth), str(tmp_path / "o.npz")])
  assert "WARNING: sha256" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o.npz")
