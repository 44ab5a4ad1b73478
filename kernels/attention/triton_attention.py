"""The Triton-language kernels (triton_lang.py) as a JAX function with a custom VJP.

    triton_attention(q, k, v, *, causal, kv_lengths, scale, block_sizes, interpret)

Same arguments and semantics as the op (layout [B, T, H, D], GQA/MQA, bottom-right causal,
kv_lengths, any T, S and D <= 256, float16 / bfloat16 / float32; rows with nothing to
attend to give zeros and zero gradients). Nothing is padded: the kernels mask rows past
T / S and lanes past D themselves. The forward saves q, k, v, the output and the base-2
LSE; the backward runs the delta, dK/dV (GQA group summed in the kernel, no atomics) and dQ
kernels. Tiles are `block_sizes.BlockSizes` (the same fields as the Pallas kernels; None:
the per-head-dim defaults), with num_warps / num_stages per kernel.

Each kernel call goes through one launcher with jax_triton's calling convention (inputs,
then one pointer per output, then the constexpr keyword arguments):
  interpret=False  jax_triton.triton_call: compiled by Triton for this GPU, a custom call.
  interpret=True   jax.pure_callback into Triton's interpreter on the host (numpy memory,
                   outputs pre-filled with NaN so an element a kernel fails to write shows).
So the CPU tests run exactly the kernels and the argument lists that the GPU runs; what
they cannot check is jax_triton's lowering and the compiled code's speed.

This module imports `triton`; jax_triton is imported only when a GPU launch happens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kernels.attention import triton_lang
from kernels.attention.block_sizes import BlockSizes, default_block_sizes
from kernels.attention.interface import validate_inputs

MAX_HEAD_DIM = 256
DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def block_d(head_dim: int) -> int:
  """Lanes of the head-dim tile: a power of two >= 16 (Triton's arange and dot need both)."""
  return max(16, 1 << (head_dim - 1).bit_length())


# --- launchers -------------------------------------------------------------------------------


def _launch_interpret(name, grid, inputs, out_shapes, num_warps, num_stages, **meta):
  del num_warps, num_stages
  from kernels.attention import triton_interpreter
  out_specs = tuple((tuple(s.shape), np.dtype(s.dtype)) for s in out_shapes)

  def host(*arrays):
    return triton_interpreter.launch(name, grid, arrays, out_specs, meta)

  return jax.pure_callback(host, tuple(out_shapes), *inputs)


def _launch_gpu(name, grid, inputs, out_shapes, num_warps, num_stages, **meta):
  import jax_triton  # optional dependency, GPU only
  return jax_triton.triton_call(
      *inputs, kernel=triton_lang.jit_kernels()[name], out_shape=tuple(out_shapes), grid=grid,
      num_warps=num_warps, num_stages=num_stages, name=f"flash_{name}", **meta)


# --- the custom_vjp function -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
  causal: bool
  scale: float
  block_sizes: BlockSizes
  interpret: bool
  t: int
  s: int
  h: int
  hkv: int
  d: int


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _static(cfg: _Config, dtype) -> dict:
  return dict(T=cfg.t, S=cfg.s, H=cfg.h, HKV=cfg.hkv, D=cfg.d, SCALE=cfg.scale,
              CAUSAL=cfg.causal, BLOCK_D=block_d(cfg.d),
              PRECISION="ieee" if jnp.dtype(dtype) == jnp.float32 else None)


@functools.lru_cache(maxsize=256)
def _make_triton_attention(cfg: _Config):
  return _build(cfg, _launch_interpret if cfg.interpret else _launch_gpu)


def _build(cfg: _Config, launch):
  """The custom_vjp function of one static configuration, launching through `launch`."""
  bs = cfg.block_sizes

  def forward(q, k, v, kv_len):
    b = q.shape[0]
    out, lse = launch(
        "attn_fwd", (_cdiv(cfg.t, bs.block_q), b * cfg.h), (q, k, v, kv_len),
        (jax.ShapeDtypeStruct(q.shape, q.dtype),
         jax.ShapeDtypeStruct((b, cfg.h, cfg.t), jnp.float32)),
        bs.num_warps, bs.num_stages, BLOCK_M=bs.block_q, BLOCK_N=bs.block_k,
        **_static(cfg, q.dtype))
    return out, lse

  @jax.custom_vjp
  def attn(q, k, v, kv_len):
    return forward(q, k, v, kv_len)[0]

  def fwd(q, k, v, kv_len):
    out, lse = forward(q, k, v, kv_len)
    return out, (q, k, v, kv_len, out, lse)

  def bwd(res, dout):
    q, k, v, kv_len, out, lse = res
    b = q.shape[0]
    dout = dout.astype(q.dtype)
    static = _static(cfg, q.dtype)
    (delta,) = launch(
        "attn_delta", (_cdiv(cfg.t, bs.block_q_dq), b * cfg.h), (out, dout),
        (jax.ShapeDtypeStruct((b, cfg.h, cfg.t), jnp.float32),),
        bs.num_warps_dq, 1, T=cfg.t, H=cfg.h, D=cfg.d, BLOCK_M=bs.block_q_dq,
        BLOCK_D=static["BLOCK_D"])
    dk, dv = launch(
        "attn_dkdv", (_cdiv(cfg.s, bs.block_k_dkv), b * cfg.hkv),
        (q, k, v, dout, lse, delta, kv_len),
        (jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        bs.num_warps_dkv, bs.num_stages_dkv, BLOCK_M=bs.block_q_dkv, BLOCK_N=bs.block_k_dkv,
        **static)
    (dq,) = launch(
        "attn_dq", (_cdiv(cfg.t, bs.block_q_dq), b * cfg.h), (q, k, v, dout, lse, delta, kv_len),
        (jax.ShapeDtypeStruct(q.shape, q.dtype),),
        bs.num_warps_dq, bs.num_stages_dq, BLOCK_M=bs.block_q_dq, BLOCK_N=bs.block_k_dq,
        **static)
    return dq, dk, dv, np.zeros(kv_len.shape, jax.dtypes.float0)

  attn.defvjp(fwd, bwd)
  return attn


# --- what is launched, and compiling it for a GPU on any machine ---------------------------


_TRITON_DTYPES = {jnp.dtype(jnp.float16): "fp16", jnp.dtype(jnp.bfloat16): "bf16",
                  jnp.dtype(jnp.float32): "fp32", jnp.dtype(jnp.int32): "i32"}


@dataclasses.dataclass(frozen=True)
class Launch:
  """One kernel launch as jax_triton makes it: pointer dtypes (inputs, then outputs), the
  grid, the launch parameters and the constexpr keyword arguments."""
  kernel: str
  grid: tuple
  pointer_dtypes: tuple
  num_warps: int
  num_stages: int
  constexprs: tuple  # sorted (name, value) pairs


def _config(q_shape, k_shape, dtype, causal, scale, block_sizes, interpret) -> _Config:
  _, t, h, d = q_shape
  s, hkv = k_shape[1], k_shape[2]
  if block_sizes is None:
    block_sizes = default_block_sizes("cpu" if interpret else "gpu", block_d(d), bool(causal),
                                      dtype)
  return _Config(causal=bool(causal), scale=float(1.0 / d ** 0.5 if scale is None else scale),
                 block_sizes=block_sizes.fit(t, s), interpret=bool(interpret), t=t, s=s, h=h,
                 hkv=hkv, d=d)


def kernel_launches(q_shape, k_shape, dtype, *, causal: bool = False,
                    scale: float | None = None,
                    block_sizes: BlockSizes | None = None) -> list[Launch]:
  """The launches of one forward + backward on a GPU (traced abstractly; nothing runs)."""
  cfg = _config(q_shape, k_shape, dtype, causal, scale, block_sizes, interpret=False)
  records = []

  def record(name, grid, inputs, out_shapes, num_warps, num_stages, **meta):
    dtypes = tuple(jnp.dtype(x.dtype) for x in list(inputs) + list(out_shapes))
    records.append(Launch(name, tuple(grid), dtypes, num_warps, num_stages,
                          tuple(sorted(meta.items()))))
    return tuple(jnp.zeros(o.shape, o.dtype) for o in out_shapes)

  attn = _build(cfg, record)
  q = jax.ShapeDtypeStruct(q_shape, dtype)
  k = jax.ShapeDtypeStruct(k_shape, dtype)
  kv_len = jax.ShapeDtypeStruct((q_shape[0],), jnp.int32)
  jax.eval_shape(lambda q, k, v, kv, do: jax.vjp(lambda a, b, c: attn(a, b, c, kv), q, k, v)[1](do),
                 q, k, k, kv_len, q)
  return records


def compile_launch(launch: Launch, *, capability: int = 90):
  """Compiles one launch with Triton for an NVIDIA GPU of compute `capability` (no GPU
  needed): the cubin jax_triton would build there. Returns triton's CompiledKernel
  (`.asm["ptx"]`, `.asm["cubin"]`, `.metadata.shared` bytes of shared memory)."""
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource
  fn = triton_lang.jit_kernels()[launch.kernel]
  names = list(fn.arg_names)
  signature = {n: "*" + _TRITON_DTYPES[dt] for n, dt in zip(names, launch.pointer_dtypes)}
  constexprs = dict(launch.constexprs)
  signature.update({n: "constexpr" for n in constexprs})
  missing = set(names) - set(signature)
  if missing:
    raise ValueError(f"launch of {launch.kernel} does not bind {sorted(missing)}")
  src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
  return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                        options={"num_warps": launch.num_warps,
                                 "num_stages": launch.num_stages})


def unsupported_reason(head_dim: int, dtype) -> Optional[str]:
  """What these kernels cannot take, as an `unsupported_reason` sentence (None: supported)."""
  if head_dim > MAX_HEAD_DIM:
    return f"head_dim={head_dim} exceeds the Triton kernel's maximum of {MAX_HEAD_DIM}."
  if jnp.dtype(dtype) not in DTYPES:
    return f"dtype {jnp.dtype(dtype)}; the Triton kernel takes float16, bfloat16 or float32."
  return None


def triton_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                     kv_lengths: jax.Array | None = None, scale: float | None = None,
                     block_sizes: BlockSizes | None = None,
                     interpret: bool = False) -> jax.Array:
  """Flash attention with our Triton-language kernels (see the module docstring)."""
  validate_inputs(q, k, v, kv_lengths, causal)
  b, d, s = q.shape[0], q.shape[3], k.shape[1]
  reason = unsupported_reason(d, q.dtype)
  if reason is not None:
    raise ValueError(reason)
  cfg = _config(q.shape, k.shape, q.dtype, causal, scale, block_sizes, interpret)
  if kv_lengths is None:
    kv_len = jnp.full((b,), s, jnp.int32)
  else:
    kv_len = jnp.clip(jnp.asarray(kv_lengths).astype(jnp.int32), 0, s)
  return _make_triton_attention(cfg)(q, k, v, kv_len)
