"""Regenerate ``tests/data/nvfp4_modelopt_fixture.json`` by running NVIDIA Model Optimizer's own NVFP4 code.

Not part of the test suite (and it ships none of NVIDIA's code): it needs a checkout of
https://github.com/NVIDIA/TensorRT-Model-Optimizer (a work tree or a bare git dir) and imports
``modelopt/torch/quantization/qtensor/nvfp4_tensor.py`` from it standalone, stubbing its three package imports
(``fp4_compatible`` -> False so the TensorRT-LLM kernel is never tried, ``BaseQuantizedTensor`` -> the same
two-attribute holder, ``reduce_amax`` / ``reduce_block_amax`` / ``reduce_block_padding`` -> taken verbatim from the
checkout's ``modelopt/torch/quantization/utils.py`` at run time). Then it quantizes a fixed set of inputs with
``NVFP4QTensor.quantize`` (the function ModelOpt's HF export calls through ``to_quantized_weight``), dequantizes with
``NVFP4QTensor.dequantize`` and writes inputs and outputs as raw little-endian bytes (base64) to the JSON fixture.

    python tests/data/make_nvfp4_modelopt_fixture.py /path/to/TensorRT-Model-Optimizer[.git]
"""
from __future__ import annotations

import base64
import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

NVFP4 = "modelopt/torch/quantization/qtensor/nvfp4_tensor.py"
UTILS = "modelopt/torch/quantization/utils.py"
OUT = Path(__file__).with_name("nvfp4_modelopt_fixture.json")


def _read(src: Path, rel: str) -> tuple[str, str]:
    """(file text, commit) from a work tree or a bare git dir."""
    if (src / rel).exists():
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        return (src / rel).read_text(), commit.strip() or "unknown"
    git = ["git", f"--git-dir={src}"]
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    return subprocess.run(git + ["show", f"HEAD:{rel}"], capture_output=True, text=True, check=True).stdout, commit


def _function_source(text: str, name: str) -> str:
    """The source of top-level ``def name`` (with its decorators) from a module's text."""
    lines = text.splitlines()
    start = end = next(i for i, ln in enumerate(lines) if ln.startswith(f"def {name}("))
    while start > 0 and lines[start - 1].startswith("@"):
        start -= 1
    end += 1
    while end < len(lines) and not re.match(r"^(def |class |@|[A-Za-z_])", lines[end]):
        end += 1
    return "\n".join(lines[start:end]) + "\n"


def load_modelopt_nvfp4(src: Path):
    nvfp4_text, commit = _read(src, NVFP4)
    utils_text, _ = _read(src, UTILS)
    root = Path(tempfile.mkdtemp(prefix="mo_nvfp4_"))
    pkg = root / "mo_stub" / "quantization"
    (pkg / "qtensor").mkdir(parents=True)
    (pkg / "backends").mkdir()
    for d in (root / "mo_stub", pkg, pkg / "qtensor", pkg / "backends"):
        (d / "__init__.py").write_text("")
    (pkg / "qtensor" / "nvfp4_tensor.py").write_text(nvfp4_text)
    (pkg / "backends" / "utils.py").write_text("def fp4_compatible():\n    return False\n")
    (pkg / "qtensor" / "base_qtensor.py").write_text(
        "class BaseQuantizedTensor:\n"
        "    def __init__(self, original_shape, original_dtype, quantized_data):\n"
        "        self.metadata = {'shape': original_shape, 'dtype': original_dtype}\n"
        "        self._quantized_data = quantized_data\n")
    (pkg / "utils.py").write_text("import torch\nimport torch.nn.functional as F\n\n" + "\n".join(
        _function_source(utils_text, f) for f in ("reduce_amax", "reduce_block_amax", "reduce_block_padding")))
    sys.path.insert(0, str(root))
    mod = importlib.import_module("mo_stub.quantization.qtensor.nvfp4_tensor")
    return mod.NVFP4QTensor, commit


# ---------------------------------------------------------------------------------------------- inputs
def inputs() -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """name -> (tensor, weights_scaling_factor_2 override or None)."""
    g = torch.Generator().manual_seed(20240601)
    cases = {}
    cases["rand_f32"] = (torch.randn(4, 64, generator=g), None)
    cases["rand_bf16"] = ((torch.randn(4, 64, generator=g) * 0.02).bfloat16(), None)
    # block amaxes spread over ~9 decades: block scales in the E4M3 subnormal range and all exponents
    spread = torch.exp(3.0 * torch.randn(4, 4, 1, generator=g))
    cases["heavy_f32"] = ((torch.randn(4, 4, 16, generator=g) * spread).reshape(4, 64), None)
    cases["heavy_bf16"] = ((torch.randn(4, 4, 16, generator=g) * spread).reshape(4, 64).bfloat16(), None)
    cases["experts_bf16"] = (torch.randn(3, 4, 32, generator=g).bfloat16(), None)   # [E, N, K], one s2
    w = torch.randn(4, 32, generator=g)
    cases["shared_s2_f32"] = (w, (w.abs().amax() * 1.75 / 2688.0).float())          # fused q/k/v style s2
    # crafted: tensor amax 2688 -> s2 == 1 exactly, so block amax 6*k gives s_b = e4m3(k)
    z = -0.0
    half = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, z]
    rows = [
        [2688.0] + [0.0] * 15 + half,                                      # s_b 448; E2M1 ties at s_b = 1
        [0.0] * 16 + [z] * 16,                                             # all-zero / all -0 blocks -> s_b 1
        [6.375, 6.3, 6.1, -6.375] + [1.0] * 12                             # s_b tie 1.0625 -> 1.0: saturation
        + [7.125, -7.125, 6.9, 0.4] + [0.1] * 12,                          # s_b tie 1.1875 -> 1.25
        [2.25, 3.75, 7.5, 18.0, -2.25, -3.75, -7.5, 15.0] + [0.75] * 8     # s_b 3: ties after scaling by 3
        + [x * 5.0 for x in half],                                         # s_b 5 (amax 30)
        [6 * 2.5 * 2 ** -9] + [1e-3] * 15                                  # s_b E4M3 subnormal tie 2.5*2^-9
        + [6 * 3.5 * 2 ** -9, -6 * 2 ** -9] + [2e-3] * 14,                 # tie 3.5*2^-9 ; min subnormal
        [6 * 448.0 * (1 - 2 ** -5), 1.0] + [0.5] * 14                      # s_b just below 448 -> 448
        + [2688.0 * 0.999, 1.0] + [z] * 14,                                # ratio 447.55 -> 448
    ]
    cases["crafted_f32"] = (torch.tensor(rows, dtype=torch.float32), None)
    cases["scale_op_order_f32"] = (_op_order_blocks(), None)
    # documented deviations (nvfp4.py docstring): a nonzero block ~1e7 below the tensor amax (ModelOpt: scale
    # byte 0, codes of x/0) and an all-zero tensor (ModelOpt: s2 = 0, 0/0 -> NaN block scales)
    w = torch.randn(2, 48, generator=g)
    w[1, 16:32] *= 1e-7
    cases["deviation_tiny_block_f32"] = (w, None)
    cases["deviation_all_zero_f32"] = (torch.zeros(2, 32), None)
    return cases


def _op_order_blocks() -> torch.Tensor:
    """Blocks whose amax puts ``amax_b / (6 * s2)`` within an ulp of an E4M3 rounding tie, picked so that the
    other op order, ``(amax_b / 6) / s2``, rounds (in fp32) to the other side of the tie and so to a different
    E4M3 byte: the fixture pins which order ModelOpt uses."""
    f = np.float32
    amax = f(5.353921413421631)
    s2 = f(amax / f(2688.0))
    e4m3 = lambda v: torch.tensor(float(v)).to(torch.float8_e4m3fn).view(torch.uint8).item()  # noqa: E731
    picked = []
    for i, tie in enumerate((1.0625, 1.1875, 1.3125, 1.4375, 1.5625, 1.6875, 1.8125, 1.9375)):
        for exp in range(-8 + i, 8):           # first hit per tie, from the E4M3 subnormals upward
            if len(picked) > i:
                break
            a0 = f(f(tie * 2.0 ** exp) * f(6.0) * s2)
            for d in range(-3, 4):
                a = f(a0 + f(d) * np.spacing(a0))
                if 0 < a < amax and e4m3(f(a / f(f(6.0) * s2))) != e4m3(f(f(a / f(6.0)) / s2)):
                    picked.append(float(a))
                    break
    g = torch.Generator().manual_seed(7)
    rows = torch.rand(len(picked) + 1, 16, generator=g) * 2 - 1
    rows[:-1] *= torch.tensor(picked).unsqueeze(1)
    rows[:-1, 3] = torch.tensor(picked)
    rows[-1, 0] = float(amax)
    return rows.reshape(-1, 32) if rows.shape[0] % 2 == 0 else torch.cat([rows, torch.zeros(1, 16)]).reshape(-1, 32)


def _b64(t: torch.Tensor) -> str:
    t = t.contiguous()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):
        t = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.view(torch.int16)
    return base64.b64encode(t.numpy().tobytes()).decode()


def main(src: str) -> None:
    torch.set_num_threads(1)
    Q, commit = load_modelopt_nvfp4(Path(src))
    out = {"modelopt_repo": "NVIDIA/TensorRT-Model-Optimizer", "modelopt_commit": commit,
           "modelopt_file": NVFP4, "generator": "tests/data/make_nvfp4_modelopt_fixture.py",
           "encoding": "base64 of little-endian bytes; bf16 as int16 bit patterns, e4m3 as uint8", "cases": {}}
    for name, (x, s2_in) in inputs().items():
        qt, scale, s2 = Q.quantize(x.clone(), 16, None, s2_in)
        deq = qt.dequantize(dtype=torch.float32, scale=scale, double_scale=s2, block_sizes={-1: 16})
        assert torch.isfinite(deq).all() or name.startswith("deviation_"), name
        out["cases"][name] = {
            "shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""),
            "input": _b64(x), "scale_2_override": None if s2_in is None else _b64(s2_in.reshape(1)),
            "packed": _b64(qt._quantized_data), "weight_scale_e4m3": _b64(scale),
            "weight_scale_2": _b64(s2.float().reshape(1)), "dequant_f32": _b64(deq.float()),
        }
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) from ModelOpt {commit}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/.mirror/NVIDIA+TensorRT-Model-Optimizer/repo")
