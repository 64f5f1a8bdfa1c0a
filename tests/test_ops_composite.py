"""The composite op (volume rendering of packed ray samples): native kernels against the
PyTorch reference, gradients, early ray termination, edge cases, and the CUDA source compiling."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from talkcli.ops import _native, use_backend
from talkcli.ops.composite import Composited, composite, composite_reference, ray_indices_from_offsets

def offsets_from_counts(counts: list[int], device="cpu") -> torch.Tensor:
    off = torch.zeros(len(counts) + 1, dtype=torch.int64)
    off[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0)
    return off.to(device)


def make_samples(counts: list[int], channels: int, *, seed: int, dtype=torch.float32, dense_every: int = 3):
    """Packed samples; every `dense_every`-th ray is dense enough to terminate early."""
    g = torch.Generator().manual_seed(seed)
    off = offsets_from_counts(counts)
    n = int(off[-1])
    ray = ray_indices_from_offsets(off, n)
    scale = torch.where(ray % dense_every == 0, 400.0, 8.0).to(dtype)
    sigmas = torch.rand(n, generator=g, dtype=dtype) * scale
    rgbs = torch.rand(n, channels, generator=g, dtype=dtype)
    deltas = torch.full((n,), 1.0 / 64, dtype=dtype) + torch.rand(n, generator=g, dtype=dtype) * 0.01
    ts = 0.5 + torch.cumsum(deltas, 0) - torch.cumsum(deltas, 0)[off[ray]]  # increasing inside each ray
    return sigmas, rgbs, deltas, ts, off


def run(fn, sigmas, rgbs, deltas, ts, off, upstream, **kw):
    """Outputs and the gradients w.r.t. sigmas and rgbs of sum(rgb*gr + opacity*go + depth*gd)."""
    s = sigmas.clone().requires_grad_()
    c = rgbs.clone().requires_grad_()
    out = fn(s, c, deltas, ts, off, **kw)
    gr, go, gd = upstream
    loss = (out.rgb * gr).sum() + (out.opacity * go).sum() + (out.depth * gd).sum()
    loss.backward()
    return out, s.grad, c.grad


def native(*args, **kw) -> Composited:
    with use_backend("native"):
        return composite(*args, **kw)


def upstream_grads(n_rays: int, channels: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_rays, channels, generator=g, dtype=dtype), torch.randn(n_rays, generator=g, dtype=dtype),
            torch.randn(n_rays, generator=g, dtype=dtype))


ODD_COUNTS = [5, 0, 1, 17, 0, 0, 33, 2, 9, 64, 3, 0, 1, 28, 11, 7, 0, 40, 19, 1, 6, 0, 13, 50, 4, 8, 0, 21, 2,
              31, 1, 0, 15, 9, 70, 3, 0]  # R = 37: empty rays, one-sample rays, one long ray


@pytest.mark.parametrize("channels", [3, 1, 4, 5])
def test_native_matches_reference(ext, channels):
    assert len(ODD_COUNTS) == 37
    inputs = make_samples(ODD_COUNTS, channels, seed=channels)
    up = upstream_grads(len(ODD_COUNTS), channels, seed=10 + channels)
    ref, ref_ds, ref_dc = run(composite_reference, *inputs, up)
    out, ds, dc = run(native, *inputs, up)
    assert (ref.weights == 0).any(), "some rays should terminate early"
    for name in ("rgb", "opacity", "depth", "weights"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(ds, ref_ds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dc, ref_dc, rtol=1e-5, atol=1e-6)
    # the weights are where the per-ray sums come from
    ray = ray_indices_from_offsets(inputs[4], inputs[0].shape[0])
    torch.testing.assert_close(torch.zeros(37).index_add(0, ray, out.weights), out.opacity, rtol=1e-5, atol=1e-6)
    assert not out.weights.requires_grad


def test_native_float64_and_no_termination(ext):
    inputs = make_samples(ODD_COUNTS, 3, seed=7, dtype=torch.float64)
    up = upstream_grads(37, 3, seed=8, dtype=torch.float64)
    for stop in (0.0, 1e-4, 0.3):
        ref, ref_ds, ref_dc = run(composite_reference, *inputs, up, stop_transmittance=stop)
        out, ds, dc = run(native, *inputs, up, stop_transmittance=stop)
        for name in ("rgb", "opacity", "depth", "weights"):
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ds, ref_ds, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(dc, ref_dc, rtol=1e-10, atol=1e-12)
    assert (composite_reference(*inputs, stop_transmittance=0.0).weights > 0).all()


def test_early_termination_huge_sigmas(ext):
    counts = [4, 1, 6, 0, 3]
    sigmas, rgbs, deltas, ts, off = make_samples(counts, 3, seed=3)
    sigmas = torch.full_like(sigmas, 1e4)  # alpha = 1 for every sample: T drops to 0 after the first
    up = upstream_grads(len(counts), 3, seed=4)
    first = torch.zeros(sigmas.shape[0], dtype=torch.bool)
    first[off[:-1][off[:-1] < off[1:]]] = True
    for fn in (composite_reference, native):
        out, ds, dc = run(fn, sigmas, rgbs, deltas, ts, off, up)
        assert torch.all(out.weights[~first] == 0) and torch.allclose(out.weights[first], torch.ones(()))
        assert torch.all(ds[~first] == 0) and torch.all(dc[~first] == 0)
        assert torch.allclose(dc[first], up[0][[0, 1, 2, 4]])
        torch.testing.assert_close(out.rgb[[0, 1, 2, 4]], rgbs[first])
        assert out.opacity[3] == 0 and torch.all(out.rgb[3] == 0)


def test_termination_threshold_matches(ext):
    # One ray whose transmittance falls below the threshold at a known sample: tau = 2 each, so
    # T_i = exp(-2 i): T_4 = 3.4e-4 >= 1e-4 > T_5 = 4.5e-5 -> samples 0..4 count, 5.. do not.
    n = 9
    sigmas = torch.full((n,), 4.0)
    deltas = torch.full((n,), 0.5)
    ts = torch.arange(n, dtype=torch.float32)
    rgbs = torch.rand(n, 3, generator=torch.Generator().manual_seed(0))
    off = torch.tensor([0, n])
    for fn in (composite_reference, native):
        w = fn(sigmas, rgbs, deltas, ts, off).weights
        assert torch.all(w[:5] > 0) and torch.all(w[5:] == 0)


def _gradcheck_inputs(stop: float):
    # Rays of 3, 1, 0 and 5 samples. With termination the last ray has a huge optical depth at
    # its second sample, so T falls from ~0.6 to ~e-20: far from the threshold on both sides.
    counts = [3, 1, 0, 5]
    g = torch.Generator().manual_seed(5)
    n = sum(counts)
    sigmas = (torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.1)
    if stop > 0:
        sigmas[5] = 80.0
    rgbs = torch.rand(n, 2, generator=g, dtype=torch.float64)
    deltas = torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.25
    ts = torch.rand(n, generator=g, dtype=torch.float64) * 3
    return sigmas.requires_grad_(), rgbs.requires_grad_(), deltas, ts, offsets_from_counts(counts)


@pytest.mark.parametrize("stop", [0.0, 1e-4])
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradcheck(ext, backend, stop):
    sigmas, rgbs, deltas, ts, off = _gradcheck_inputs(stop)

    def f(s, c):
        with use_backend(backend):
            out = composite(s, c, deltas, ts, off, stop_transmittance=stop)
        return out.rgb, out.opacity, out.depth

    if stop > 0:
        with use_backend(backend):
            w = composite(sigmas, rgbs, deltas, ts, off, stop_transmittance=stop).weights
        assert torch.all(w[:6] > 0) and torch.all(w[6:] == 0)  # the last ray stops after sample 5
    assert torch.autograd.gradcheck(f, (sigmas, rgbs), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_empty_inputs(ext, backend):
    for n_rays in (4, 0):
        off = torch.zeros(n_rays + 1, dtype=torch.int64)
        sigmas = torch.zeros(0, requires_grad=True)
        rgbs = torch.zeros(0, 3, requires_grad=True)
        with use_backend(backend):
            out = composite(sigmas, rgbs, torch.zeros(0), torch.zeros(0), off)
        assert out.rgb.shape == (n_rays, 3) and out.opacity.shape == (n_rays,) and out.depth.shape == (n_rays,)
        assert out.weights.shape == (0,)
        assert torch.all(out.rgb == 0) and torch.all(out.opacity == 0) and torch.all(out.depth == 0)
        (out.rgb.sum() + out.opacity.sum() + out.depth.sum()).backward()
        assert sigmas.grad.shape == (0,) and rgbs.grad.shape == (0, 3)


def test_no_gradient_for_geometry(ext):
    sigmas, rgbs, deltas, ts, off = make_samples([4, 2, 7], 3, seed=9)
    for fn in (composite_reference, native):
        d = deltas.clone().requires_grad_()
        t = ts.clone().requires_grad_()
        s = sigmas.clone().requires_grad_()
        out = fn(s, rgbs, d, t, off)
        (out.rgb.sum() + out.depth.sum()).backward()
        assert d.grad is None and t.grad is None and s.grad is not None


def test_bad_inputs(ext):
    sigmas, rgbs, deltas, ts, off = make_samples([4, 2, 7], 3, seed=11)
    for fn in (native, composite_reference):
        with pytest.raises(ValueError, match="ray_offsets"):
            fn(sigmas, rgbs, deltas, ts, torch.tensor([0, 4, 6, 12]))  # does not end at S = 13
        with pytest.raises(ValueError, match="non-decreasing"):
            fn(sigmas, rgbs, deltas, ts, torch.tensor([0, 7, 6, 13]))
    with use_backend("native"):
        with pytest.raises(ValueError, match="rgbs"):
            composite(sigmas, rgbs[:5], deltas, ts, off)
        with pytest.raises(ValueError, match="int64"):
            composite(sigmas, rgbs, deltas, ts, off.int())
    with pytest.raises(ValueError, match="dtype"):
        composite_reference(sigmas, rgbs.double(), deltas, ts, off)


def test_cuda_matches_reference(cuda_ext):
    inputs = make_samples(ODD_COUNTS, 3, seed=21)
    up = upstream_grads(37, 3, seed=22)
    ref, ref_ds, ref_dc = run(composite_reference, *inputs, up)
    out, ds, dc = run(native, *[t.cuda() for t in inputs], tuple(u.cuda() for u in up))
    for name in ("rgb", "opacity", "depth", "weights"):
        torch.testing.assert_close(getattr(out, name).cpu(), getattr(ref, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds.cpu(), ref_ds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dc.cpu(), ref_dc, rtol=1e-5, atol=1e-6)


# The GPU kernel runs the per-sample path of kernels/composite.h (kBlocked = false), the CPU
# kernel the blocked one. Without a GPU, run both paths on the host and require the same bits
# (fp contraction off: otherwise the compiler may fuse multiply-adds differently per path).
PATHS_HARNESS = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "composite.h"

template <typename T, int CC>
int check(int C) {
  std::srand(1);
  const int R = 23;
  std::vector<int64_t> off(R + 1, 0);
  for (int r = 0; r < R; ++r) off[r + 1] = off[r] + (r % 5 == 1 ? 0 : std::rand() % 150);
  const int64_t S = off[R];
  auto rnd = [] { return T(std::rand()) / T(RAND_MAX); };
  std::vector<T> sig(S), rgb(S * C), del(S), ts(S), gr(R * C), go(R), gd(R);
  for (int64_t i = 0; i < S; ++i) {
    sig[i] = rnd() * (i % 7 ? T(5) : T(60));
    del[i] = T(0.02) * rnd();
    ts[i] = rnd();
  }
  for (auto& x : rgb) x = rnd();
  for (auto& x : gr) x = rnd() - T(0.5);
  for (int r = 0; r < R; ++r) go[r] = rnd() - T(0.5), gd[r] = rnd() - T(0.5);
  std::vector<T> out[2][6];
  for (int b = 0; b < 2; ++b) {
    out[b][0].assign(R * C, 0), out[b][1].assign(R, 0), out[b][2].assign(R, 0), out[b][3].assign(S, -1);
    out[b][4].assign(S, -1), out[b][5].assign(S * C, -1);
    for (int r = 0; r < R; ++r) {
      int64_t be, en;
      tk::composite_ray_range(off.data(), r, S, &be, &en);
      auto fwd = b ? tk::composite_forward_ray<T, CC, true> : tk::composite_forward_ray<T, CC, false>;
      auto bwd = b ? tk::composite_backward_ray<T, CC, true> : tk::composite_backward_ray<T, CC, false>;
      fwd(sig.data(), rgb.data(), del.data(), ts.data(), be, en, C, T(1e-4), out[b][0].data() + r * C,
          out[b][1].data() + r, out[b][2].data() + r, out[b][3].data());
      bwd(gr.data() + r * C, go[r], gd[r], sig.data(), rgb.data(), del.data(), ts.data(), be, en, C, T(1e-4),
          out[b][0].data() + r * C, out[b][1][r], out[b][2][r], out[b][4].data(), out[b][5].data());
    }
  }
  int bad = 0, stopped = 0;
  for (int k = 0; k < 6; ++k) bad += out[0][k] != out[1][k];
  for (T w : out[1][3]) stopped += w == 0;
  std::printf("C=%d S=%lld stopped=%d mismatches=%d\n", C, (long long)S, stopped, bad);
  return bad + (stopped == 0) + (stopped == S);
}

int main() {
  int bad = check<float, 3>(3) + check<float, 1>(1) + check<float, 0>(5) + check<double, 3>(3) +
            check<double, 0>(2);
  std::puts(bad ? "MISMATCH" : "OK");
  return bad != 0;
}
"""


def test_gpu_path_matches_cpu_path(tmp_path):
    cxx = _native._compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "paths.cpp"
    src.write_text(PATHS_HARNESS)
    exe = tmp_path / "paths"
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-march=native", "-ffp-contract=off", "-I",
                            str(_native.kernel_dir()), str(src), "-o", str(exe)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout


@pytest.mark.parametrize("arch", [None, "sm_80"])
def test_cuda_source_compiles(tmp_path, arch):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    kernels = _native.kernel_dir()
    cmd = [nvcc, "-std=c++17", "-O3", "-I", str(kernels), "-c", str(kernels / "cuda" / "composite.cu"),
           "-o", str(tmp_path / "composite.o")]
    if arch:
        cmd.insert(1, f"-arch={arch}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "composite.o").stat().st_size > 0
