"""ScaleCrafter's dispersed convolution: the linear map R from a 3x3 kernel to a 5x5 kernel.

The reference solves it symbolically in MATLAB (`disperse/kernel_disperse.m`); here the same least
squares problem is built numerically. For a small kernel a, a large kernel b and an input x:
  structure term  conv(U x, b) - U conv(x, a)   (U = bilinear x`scale` upsampling, align-corners
                                                  geometry: n -> scale*(n-1)+1 pixels)
  pixel term      conv(x, b) - conv(x, a)       (on the original grid)
both "same" zero-padded cross-correlations. Each coefficient of x_p in an output pixel q is one
linear equation in (a, b); stacking [structure; eta * pixel] and solving the normal equations over
b gives b = R a. Kernels are flattened row-major, as torch's `view` does. The MATLAB code drops
identically-zero equations first; a zero row adds nothing to the normal equations, so it is
not needed here.

R is cached as a safetensors file (solving takes milliseconds, but the file lets a user inspect
or swap the matrix); the directory is $UNETMODS_CACHE or ~/.cache/sd-webui-unetmods.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch


def bilinear_upsample_matrix(n: int, scale: int) -> np.ndarray:
    """(m*m, n*n) matrix of bilinear upsampling with align-corners geometry, m = scale*(n-1)+1."""
    m = scale * (n - 1) + 1
    one_d = np.zeros((m, n))
    for i in range(m):
        pos = i / scale
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        one_d[i, lo] += 1 - frac
        one_d[i, hi] += frac
    return np.kron(one_d, one_d)


def conv_tap_matrices(size: int, kernel: int) -> np.ndarray:
    """(kernel*kernel, size*size, size*size): tap t's contribution to a "same" zero-padded
    cross-correlation, out[i, j] += k[t] * x[i + ty - pad, j + tx - pad]."""
    pad = (kernel - 1) // 2
    taps = np.zeros((kernel * kernel, size * size, size * size))
    for ty in range(kernel):
        for tx in range(kernel):
            for i in range(size):
                for j in range(size):
                    y, x = i + ty - pad, j + tx - pad
                    if 0 <= y < size and 0 <= x < size:
                        taps[ty * kernel + tx, i * size + j, y * size + x] = 1.0
    return taps


def dispersion_system(small: int = 3, large: int = 5, input_size: int = 3, scale: int = 2,
                      eta: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(L, M): the residual of large kernel b against small kernel a is L @ b - M @ a."""
    up = bilinear_upsample_matrix(input_size, scale)
    m = scale * (input_size - 1) + 1
    # columns = kernel taps, rows = (output pixel, input pixel) pairs
    struct_b = np.stack([(t @ up).ravel() for t in conv_tap_matrices(m, large)], axis=1)
    struct_a = np.stack([(up @ t).ravel() for t in conv_tap_matrices(input_size, small)], axis=1)
    pixel_b = np.stack([t.ravel() for t in conv_tap_matrices(input_size, large)], axis=1)
    pixel_a = np.stack([t.ravel() for t in conv_tap_matrices(input_size, small)], axis=1)
    lhs = np.concatenate([struct_b, eta * pixel_b])
    rhs = np.concatenate([struct_a, eta * pixel_a])
    return lhs, rhs


def solve_dispersion(small: int = 3, large: int = 5, input_size: int = 3, scale: int = 2, eta: float = 0.05) -> np.ndarray:
    """R (large**2, small**2) with dispersed kernel = R @ kernel.flatten(), from the normal
    equations as the reference; defaults = its R20to1_new (README: inputSize = smallSize, eta 0.05)."""
    lhs, rhs = dispersion_system(small, large, input_size, scale, eta)
    return np.linalg.solve(lhs.T @ lhs, lhs.T @ rhs)


def cache_dir() -> Path:
    return Path(os.environ.get("UNETMODS_CACHE") or Path.home() / ".cache" / "sd-webui-unetmods")


def load_or_solve(path: Path) -> torch.Tensor:
    """R from the safetensors file at `path`, solving and writing it when missing or malformed."""
    from safetensors.torch import load_file, save_file

    try:
        r = load_file(str(path))["R"]
        if r.shape == (25, 9) and r.dtype == torch.float64:
            return r
    except Exception:  # missing or unreadable (safetensors raises its own error type): solve again
        pass
    r = torch.from_numpy(solve_dispersion())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"R": r}, str(path))
    except OSError:  # read-only home: the solved matrix still works for this process
        pass
    return r


@functools.lru_cache(maxsize=1)
def dispersion_matrix() -> torch.Tensor:
    """R20to1_new (25x9, float64), solved once and cached on disk and per process."""
    return load_or_solve(cache_dir() / "scalecrafter_R_3to5_n3_s2_eta0.05.safetensors")
