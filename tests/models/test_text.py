"""Tokenizer (vocabulary, round trip, JSON, clear errors) and the text encoder (padding never
matters, the empty caption is well defined)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models.text import EMPTY, PAD, TextEncoder, Tokenizer

CAPTIONS = ["small red circle at top left", "large blue square at centre",
            "medium green triangle at bottom right", "small blue circle at centre"]


def test_vocabulary_is_deterministic_and_round_trips():
  tok = Tokenizer.from_captions(CAPTIONS)
  assert Tokenizer.from_captions(CAPTIONS[::-1] + CAPTIONS) == tok  # order and repeats ignored
  words = sorted({w for c in CAPTIONS for w in c.split()})
  assert tok.vocabulary == (PAD, EMPTY, *words) and tok.vocab_size == len(words) + 2
  prompts = CAPTIONS + [""]
  ids, lengths = tok.encode(prompts, max_len=7)
  assert ids.dtype == np.int32 and lengths.dtype == np.int32 and ids.shape == (5, 7)
  np.testing.assert_array_equal(lengths, [6, 5, 6, 5, 0])
  pad = np.arange(7)[None] >= lengths[:, None]
  assert ids[4, 0] == Tokenizer.EMPTY_ID  # the empty caption, all padding past position 0
  pad[4, 0] = False
  assert np.all(ids[pad] == Tokenizer.PAD_ID)
  assert tok.decode(ids, lengths) == prompts
  assert tok.max_length(prompts) == 6
  again = Tokenizer.from_json(tok.to_json())
  assert again == tok and np.array_equal(again.encode(prompts, 7)[0], ids)


def test_errors_name_the_problem():
  tok = Tokenizer.from_captions(CAPTIONS)
  with pytest.raises(ValueError, match=r"unknown word 'purple'.*circle, green, large"):
    tok.encode(["small purple circle at centre"], 7)
  with pytest.raises(ValueError, match="more than max_len=3"):
    tok.encode(CAPTIONS[:1], 3)
  with pytest.raises(ValueError, match="not one string"):
    tok.encode("small red circle", 7)
  with pytest.raises(ValueError, match="reserved"):
    Tokenizer.from_captions(["a <pad> b"])
  with pytest.raises(ValueError, match="not a word_tokenizer"):
    Tokenizer.from_json('{"kind": "bpe"}')


def _random_params(model, *args, seed=0):
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                      shapes)


def test_text_encoder_ignores_padding_and_defines_the_empty_caption():
  tok = Tokenizer.from_captions(CAPTIONS)
  model = TextEncoder(vocab_size=tok.vocab_size, max_len=9, width=16, depth=2, num_heads=2,
                      attention_impl="xla")
  ids, lengths = tok.encode(CAPTIONS[:2] + [""], 9)
  params = _random_params(model, ids, lengths)
  encode = jax.jit(lambda i, n: model.apply({"params": params}, i, n))
  out = np.asarray(encode(ids, lengths))
  assert out.shape == (3, 9, 16) and np.all(np.isfinite(out))
  # Other ids in the padding leave everything unchanged, valid positions included.
  noisy = ids.copy()
  pad = np.arange(9)[None] >= lengths[:, None]
  noisy[pad] = np.random.default_rng(1).integers(0, tok.vocab_size, pad.sum())
  np.testing.assert_allclose(np.asarray(encode(noisy, lengths)), out, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out[pad], 0.0)  # padded outputs (the empty caption: all) are 0
  # A caption's features do not depend on how much padding follows it.
  short = np.asarray(encode(*tok.encode(CAPTIONS[:2] + [""], 6)))
  np.testing.assert_allclose(short, out[:, :6], rtol=1e-5, atol=1e-5)
  # The words matter: a different valid token changes the output.
  changed = ids.copy()
  changed[0, 2] = tok.tokenize("square")[0]
  assert np.abs(np.asarray(encode(changed, lengths))[0] - out[0]).max() > 1e-3
