"""Convert pytorch-fid's Inception weights (.pth) to the .npz that research.metrics.inception reads.

  python -m experiments.convert_inception_weights pt_inception-2015-12-05-6726825d.pth \
      ~/fid/inception_fid.npz

The .pth is pytorch-fid's release asset (mseitzer/pytorch-fid, "fid_weights"); get it
yourself: this script downloads nothing. It needs torch only to read the .pth (imported here,
not by the library). The .npz keeps the torch state_dict names and layouts (OIHW convs); it is
checked against the Flax network (every name and shape) before it is written. Then set
--config.eval.inception_weights=PATH_TO.npz.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from research.metrics import inception

# torch hub names release files <name>-<first 8 hex digits of the file's sha256>.<ext>.
EXPECTED_SHA256_PREFIX = "6726825d"


def convert_state_dict(state_dict: Mapping[str, np.ndarray], out_path: str,
                       source: str = "state_dict") -> Dict[str, tuple]:
  """Check a numpy state_dict against the network and write the arrays it needs to out_path.

  Returns {name: shape} of what was written. Raises ValueError (named keys) on a mismatch;
  nothing is written then.
  """
  inception.variables_from_state_dict(state_dict, source=source)  # raises on any mismatch
  needed = inception.torch_state_dict_shapes()
  arrays = {k: np.asarray(state_dict[k], np.float32) for k in needed}
  out_dir = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(out_dir, exist_ok=True)
  tmp = f"{out_path}.tmp{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, out_path)
  return {k: v.shape for k, v in arrays.items()}


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _read_pth(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit("Reading a .pth needs PyTorch, which is not installed here: "
                     "`pip install torch` (CPU wheels suffice) in any environment, run this "
                     "script there, and copy the .npz back.") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except TypeError:  # torch < 1.13 has no weights_only
    obj = torch.load(path, map_location="cpu")
  if isinstance(obj, Mapping) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise SystemExit(f"{path} holds a {type(obj).__name__}, not a state_dict.")
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("pth", help=f"pytorch-fid's {inception.WEIGHTS_FILE}")
  parser.add_argument("npz", help="output .npz (what config.eval.inception_weights names)")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.pth):
    raise SystemExit(f"Input {args.pth!r} does not exist (this script downloads nothing).")
  digest = _sha256(args.pth)
  if not digest.startswith(EXPECTED_SHA256_PREFIX):
    print(f"WARNING: sha256 {digest[:16]}... does not start with {EXPECTED_SHA256_PREFIX}, the "
          f"prefix in {inception.WEIGHTS_FILE}'s name: FID from these weights is not the "
          "standard one.", file=sys.stderr)
  try:
    written = convert_state_dict(_read_pth(args.pth), args.npz, source=args.pth)
  except ValueError as e:
    raise SystemExit(str(e)) from e
  print(f"Wrote {len(written)} arrays ({sum(int(np.prod(s)) for s in written.values()):,} "
        f"numbers) to {args.npz}")


if __name__ == "__main__":
  main()
