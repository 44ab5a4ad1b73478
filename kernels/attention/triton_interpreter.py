"""Triton's interpreter in a child process, for running our Triton kernels on a CPU.

Triton's interpreter needs TRITON_INTERPRET=1 before `triton` is first imported (its own
library functions, tl.cdiv, tl.sum, ..., are then interpreted too), and a process that
imported triton without it can only compile. So the interpreter lives in one long-lived
child process (`python -m kernels.attention.triton_interpreter`, started on first use) and
the caller's process keeps compiling. Requests and replies are pickles over the child's
stdin/stdout: (kernel name, grid, input arrays, output (shape, dtype)s, constexprs) ->
output arrays, or the child's traceback text, which `launch` raises as a RuntimeError.
"""
from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading

import ml_dtypes
import numpy as np

class _HostStorage:
  def __init__(self, tensor):
    self._tensor = tensor

  def data_ptr(self):
    return self._tensor.data_ptr()

  def cpu(self):
    return self

  def copy_(self, other):
    del other  # same memory: the interpreter wrote into the numpy buffer already


class HostTensor:
  """The few torch.Tensor methods Triton's interpreter calls, over a numpy array."""

  def __init__(self, array: np.ndarray):
    self.array = np.array(array, copy=True, order="C")

  @property
  def dtype(self):
    import triton.language as tl
    return {np.dtype(np.float32): tl.float32, np.dtype(np.float16): tl.float16,
            np.dtype(ml_dtypes.bfloat16): tl.bfloat16, np.dtype(np.int32): tl.int32}[
                self.array.dtype]

  def data_ptr(self):
    return self.array.ctypes.data

  def untyped_storage(self):
    return _HostStorage(self)

  def new_empty(self, *args, **kwargs):
    del args, kwargs
    return self

  def set_(self, *args):
    del args
    return self

  def storage_offset(self):
    return 0

  def size(self):
    return self.array.shape

  def stride(self):
    return tuple(s // self.array.itemsize for s in self.array.strides)

  def copy_(self, other):
    del other


_LOCK = threading.Lock()
_CHILD = None


def _send(stream, obj) -> None:
  data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
  stream.write(struct.pack("<Q", len(data)))
  stream.write(data)
  stream.flush()


def _recv(stream):
  header = stream.read(8)
  if len(header) < 8:
    raise EOFError("the Triton interpreter process closed its output")
  (n,) = struct.unpack("<Q", header)
  return pickle.loads(stream.read(n))


def _child() -> subprocess.Popen:
  global _CHILD
  if _CHILD is None or _CHILD.poll() is not None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    _CHILD = subprocess.Popen([sys.executable, "-m", "kernels.attention.triton_interpreter"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
  return _CHILD


def launch(name: str, grid: tuple, arrays, out_specs, meta: dict):
  """Runs kernel `name` of triton_lang over numpy `arrays` in the interpreter process."""
  with _LOCK:
    child = _child()
    _send(child.stdin, (name, tuple(grid), [np.asarray(a) for a in arrays], out_specs, meta))
    ok, result = _recv(child.stdout)
  if not ok:
    raise RuntimeError(f"Triton interpreter, kernel {name}:\n{result}")
  return result


def _patch_index_for_numpy2() -> None:
  """Triton's interpreter holds scalars as 1-element arrays and turns them into loop bounds
  with int(array), which NumPy >= 2.4 refuses for ndim > 0 (triton 3.6 still does it):
  read the one element instead. The interpreter restores its patches in reverse order, so
  setting __index__ again after it does is undone cleanly."""
  from triton.runtime import interpreter
  original = interpreter._patch_lang_tensor  # pylint: disable=protected-access
  if getattr(original, "_scalar_index", False):
    return

  def patched(tensor, scope):
    original(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

  patched._scalar_index = True
  interpreter._patch_lang_tensor = patched  # pylint: disable=protected-access


def _patch_bf16_dot() -> None:
  """Triton's interpreter stores bfloat16 as its uint16 bit pattern and converts it in casts,
  but its dot multiplies those bit patterns as integers (triton 3.6): give the dot the
  bfloat16 operands' float32 values instead (exact: bf16 -> f32 is a widening)."""
  import triton.language as tl
  from triton.runtime import interpreter
  builder = interpreter.InterpreterBuilder
  original = builder.create_dot
  if getattr(original, "_bf16", False):
    return

  def as_f32(handle):
    if handle.dtype.scalar == tl.bfloat16:
      data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None)  # pylint: disable=protected-access
      return interpreter.TensorHandle(data.view(np.float32), tl.float32)
    return handle

  def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    return original(self, as_f32(a), as_f32(b), d, input_precision, max_num_imprecise_acc)

  create_dot._bf16 = True
  builder.create_dot = create_dot


def _serve() -> None:
  import traceback
  from kernels.attention import triton_lang
  _patch_index_for_numpy2()
  _patch_bf16_dot()
  stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
  sys.stdout = sys.stderr  # kernel prints must not corrupt the reply stream
  while True:
    try:
      name, grid, arrays, out_specs, meta = _recv(stdin)
    except EOFError:
      return
    try:
      kernel = triton_lang.interpreted_kernels()[name]
      ins = [HostTensor(a) for a in arrays]
      outs = [HostTensor(np.full(shape, np.nan, dtype))
              for shape, dtype in out_specs]
      kernel[grid](*ins, *outs, **meta)
      reply = (True, tuple(o.array for o in outs))
    except Exception:  # noqa: BLE001 - the parent raises it with this text
      reply = (False, traceback.format_exc())
    _send(stdout, reply)


if __name__ == "__main__":
  _serve()
