"""Text conditioning for latent diffusion: a word-level tokenizer and a small text encoder.

  tok = Tokenizer.from_captions(train_captions)          # vocabulary from the data
  ids, lengths = tok.encode(["small red circle at top left", ""], max_len=8)
  context = TextEncoder(vocab_size=tok.vocab_size, max_len=8).apply(v, ids, lengths)

The captions of a procedural dataset use a small closed vocabulary, so whole words are
tokens; a word outside it is an error (there is no <unk>: a prompt the model has never seen
a word of should fail loudly, naming the word and the vocabulary). The tokenizer is plain data
(`to_json` / `from_json`), saved with the checkpoint so sampling encodes prompts exactly as
training did.

The empty caption "" has length 0 and is the null condition of classifier-free guidance
(trained by caption dropout): every key is padding, so the encoder's self-attention and the
UNet's cross-attention attend to nothing, which our attention op defines as a zero output.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterable, List, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from research.models.layers import MultiHeadAttention

PAD, EMPTY = "<pad>", "<empty>"
JSON_KIND = "word_tokenizer"
JSON_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Whitespace-separated words <-> int32 ids, with a vocabulary fixed at construction.

  Ids: 0 = PAD (every position at or past a caption's length), 1 = EMPTY (written at
  position 0 of the empty caption, so an all-padding row reads as "the empty caption" rather
  than as missing data; it is masked like padding, since that row's length is 0), then the
  words in sorted order (deterministic whatever order the captions come in).

  Attributes:
    words: the vocabulary without the reserved tokens, sorted and unique.
  """
  words: Tuple[str, ...]

  PAD_ID = 0
  EMPTY_ID = 1
  NUM_RESERVED = 2

  def __post_init__(self):
    words = tuple(self.words)
    if list(words) != sorted(set(words)):
      raise ValueError("Tokenizer.words must be sorted and unique; build it with "
                       "Tokenizer.from_captions(captions).")
    bad = [w for w in words if w in (PAD, EMPTY) or not w or w != w.strip() or " " in w]
    if bad:
      raise ValueError(f"Tokenizer.words {bad} are not allowed: words are non-empty, hold no "
                       f"whitespace and are not the reserved {PAD!r} / {EMPTY!r}.")
    object.__setattr__(self, "words", words)
    object.__setattr__(self, "_ids", {w: i + self.NUM_RESERVED for i, w in enumerate(words)})

  @classmethod
  def from_captions(cls, captions: Iterable[str]) -> "Tokenizer":
    """The tokenizer whose vocabulary is every word of `captions`."""
    words = set()
    for caption in captions:
      words.update(_split(caption))
    return cls(tuple(sorted(words)))

  @property
  def vocab_size(self) -> int:
    return len(self.words) + self.NUM_RESERVED

  @property
  def vocabulary(self) -> Tuple[str, ...]:
    """Token strings by id."""
    return (PAD, EMPTY) + self.words

  def max_length(self, captions: Iterable[str]) -> int:
    """Words in the longest caption (the smallest max_len that encodes them all)."""
    return max((len(_split(c)) for c in captions), default=0)

  def tokenize(self, caption: str) -> List[int]:
    """The ids of one caption's words; ValueError naming an unknown word and the vocabulary."""
    ids = []
    for word in _split(caption):
      if word not in self._ids:
        raise ValueError(f"caption {caption!r}: unknown word {word!r}. The vocabulary "
                         f"({len(self.words)} words) is: {', '.join(self.words)}.")
      ids.append(self._ids[word])
    return ids

  def encode(self, captions: Sequence[str], max_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, max_len], lengths int32 [B]) of `captions`, padded with PAD_ID.

    The empty caption gets length 0 and EMPTY_ID at position 0. A caption longer than
    max_len raises ValueError (truncation would silently change the prompt).
    """
    if isinstance(captions, str):
      raise ValueError("encode takes a sequence of captions, not one string; wrap it in a list.")
    if int(max_len) != max_len or max_len < 1:
      raise ValueError(f"max_len={max_len!r} must be an int >= 1.")
    ids = np.full((len(captions), int(max_len)), self.PAD_ID, np.int32)
    lengths = np.zeros((len(captions),), np.int32)
    for i, caption in enumerate(captions):
      row = self.tokenize(str(caption))
      if len(row) > max_len:
        raise ValueError(f"caption {caption!r} has {len(row)} words, more than max_len="
                         f"{max_len}; raise max_len (the text encoder's) or shorten it.")
      if row:
        ids[i, :len(row)] = row
      else:
        ids[i, 0] = self.EMPTY_ID
      lengths[i] = len(row)
    return ids, lengths

  def decode(self, ids, lengths) -> List[str]:
    """The captions of ids [B, L] with lengths [B] (the inverse of `encode`)."""
    ids, lengths = np.asarray(ids), np.asarray(lengths)
    if ids.ndim != 2 or lengths.shape != ids.shape[:1]:
      raise ValueError(f"decode needs ids [B, L] and lengths [B], got {ids.shape}, "
                       f"{lengths.shape}.")
    if np.any(lengths < 0) or np.any(lengths > ids.shape[1]):
      raise ValueError(f"lengths must lie in [0, {ids.shape[1]}], got {lengths.tolist()}.")
    vocab = self.vocabulary
    out = []
    for row, n in zip(ids, lengths):
      words = row[:n]
      if np.any(words < self.NUM_RESERVED) or np.any(words >= self.vocab_size):
        raise ValueError(f"ids {row[:n].tolist()} hold reserved or out-of-range ids inside "
                         f"the caption; word ids are {self.NUM_RESERVED}..{self.vocab_size - 1}.")
      out.append(" ".join(vocab[i] for i in words))
    return out

  def to_json(self) -> str:
    return json.dumps({"kind": JSON_KIND, "version": JSON_VERSION, "reserved": [PAD, EMPTY],
                       "words": list(self.words)})

  @classmethod
  def from_json(cls, text: str) -> "Tokenizer":
    data = json.loads(text)
    if data.get("kind") != JSON_KIND or data.get("version") != JSON_VERSION:
      raise ValueError(f"not a {JSON_KIND} v{JSON_VERSION} JSON (kind={data.get('kind')!r}, "
                       f"version={data.get('version')!r}).")
    if data.get("reserved") != [PAD, EMPTY]:
      raise ValueError(f"reserved tokens {data.get('reserved')} differ from {[PAD, EMPTY]}.")
    return cls(tuple(data["words"]))


def _split(caption: str) -> List[str]:
  return str(caption).split()


class TextBlock(nn.Module):
  """Pre-LN transformer block: x + SelfAttn(LN(x)), then + MLP(LN(x)); padding masked."""
  num_heads: int
  mlp_ratio: int
  attention_impl: str

  @nn.compact
  def __call__(self, x, lengths):
    width = x.shape[-1]
    h = MultiHeadAttention(num_heads=self.num_heads, attention_impl=self.attention_impl,
                           name="attn")(nn.LayerNorm(name="ln_attn")(x), kv_lengths=lengths)
    x = x + h
    h = nn.Dense(self.mlp_ratio * width, name="mlp_in")(nn.LayerNorm(name="ln_mlp")(x))
    return x + nn.Dense(width, name="mlp_out")(nn.gelu(h))


class TextEncoder(nn.Module):
  """ids int32 [B, L], lengths int32 [B] -> token features [B, L, width].

  Token + learned position embeddings, `depth` pre-LN blocks whose self-attention (through
  layers.MultiHeadAttention, hence kernels.attention) gets kv_lengths = lengths so no token
  attends to padding, and a final LayerNorm. Outputs at padded positions (>= length) are
  set to zero, so the output depends on the caption's words only; the empty caption
  (length 0) gives all zeros, a well-defined null condition.
  """
  vocab_size: int
  max_len: int                 # longest caption (position embeddings)
  width: int = 64              # token feature width (the UNet's context_dim)
  depth: int = 2               # transformer blocks
  num_heads: int = 2
  mlp_ratio: int = 4
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, ids, lengths):
    if ids.ndim != 2 or lengths.shape != ids.shape[:1]:
      raise ValueError(f"text encoder needs ids [B, L] and lengths [B], got {ids.shape}, "
                       f"{lengths.shape}.")
    if ids.shape[1] > self.max_len:
      raise ValueError(f"text encoder: {ids.shape[1]} tokens exceed max_len={self.max_len}.")
    if self.width % self.num_heads:
      raise ValueError(f"text encoder: width={self.width} must be divisible by "
                       f"num_heads={self.num_heads}.")
    length = ids.shape[1]
    x = nn.Embed(self.vocab_size, self.width, name="token_embed")(ids)
    pos = self.param("position_embed", nn.initializers.normal(0.02), (self.max_len, self.width))
    x = x + pos[None, :length]
    lengths = lengths.astype(jnp.int32)
    for i in range(self.depth):
      x = TextBlock(self.num_heads, self.mlp_ratio, self.attention_impl, name=f"block_{i}")(
          x, lengths)
    x = nn.LayerNorm(name="ln_final")(x)
    valid = jnp.arange(length)[None, :] < lengths[:, None]
    return jnp.where(valid[..., None], x, 0.0)
