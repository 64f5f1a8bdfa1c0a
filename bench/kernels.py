"""Native kernels vs their PyTorch references (and nerfstudio's torch hash encoding) in one run.

    python bench/kernels.py                 # all ops at the issue's sizes, markdown table on stdout
    python bench/kernels.py --ops hashgrid --repeat 5 --json out.json

nerfstudio is a peer, not a dependency: ``pip install --no-deps nerfstudio viser jaxtyping msgspec
websockets zstandard`` makes ``HashEncoding(implementation="torch")`` importable; without it that
row says so. Times are medians over ``--repeat`` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from talkcli.ops import _native, use_backend  # noqa: E402

ROWS: list[dict] = []


def timeit(fn, repeat: int, warmup: int = 10) -> float:
    # warm-up: the first-use build, and the allocator's first large blocks: for the first ~8 calls
    # at the hash grid's sizes, each fresh 32 MB output is faulted in page by page, which halves
    # the rate (3.8 vs 7.7 M pts/s measured); the table reports the steady state
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def vector_isa() -> str:
    """The widest x86 vector extension of this CPU: the native kernels are built for it
    (-march=native), and the same model name comes with or without AVX-512 on cloud hosts."""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.machine()
    return next((isa for isa in ("avx512f", "avx2", "sse4_2") if isa in flags), "no SSE4.2").replace("avx512f", "AVX-512").upper()


def row(op: str, case: str, impl: str, seconds: float, items: float, unit: str) -> None:
    ROWS.append({"op": op, "case": case, "impl": impl, "seconds": seconds, "rate": items / seconds, "unit": unit})
    print(f"  {op:16s} {case:28s} {impl:12s} {seconds * 1e3:10.2f} ms  {items / seconds / 1e6:9.3f} M {unit}/s",
          file=sys.stderr, flush=True)


def both(op, case, make, repeat, items, unit, impls=("native", "reference")):
    """Time ``make()`` (a closure doing the work) under each backend."""
    for impl in impls:
        with use_backend(impl):
            # the slow implementations run long enough per call for one warm-up
            row(op, case, impl, timeit(make, repeat, 10 if impl == "native" else 1), items, unit)


# ---------------------------------------------------------------- hash grid
def bench_hashgrid(args):
    from talkcli.ops.hashgrid import hash_encode
    from talkcli.ops.hashspec import HashGridSpec

    n = 2 ** args.log2_points
    g = torch.Generator().manual_seed(0)
    for features in (2, 4) if not args.quick else (2,):
        spec = HashGridSpec(dims=3, levels=16, features=features, log2_table=19, base_resolution=16,
                            finest_resolution=2048)
        table = ((torch.rand(spec.n_entries, features, generator=g) - 0.5) * 2e-4).requires_grad_()
        x = torch.rand(n, 3, generator=g)
        xg = x.clone().requires_grad_()
        w = torch.randn(n, spec.output_dim, generator=g)
        case = f"N=2^{args.log2_points} L16 F{features} T19"

        def fwd():
            with torch.no_grad():
                hash_encode(x, table, spec)

        def fwd_bwd():
            table.grad = None
            (hash_encode(x, table, spec) * w).sum().backward()

        def fwd_bwd_x():
            table.grad = xg.grad = None
            (hash_encode(xg, table, spec) * w).sum().backward()

        impls = ("native", "reference") if features == 2 else ("native",)
        both("hashgrid", case + " fwd", fwd, args.repeat, n, "pts", impls)
        both("hashgrid", case + " fwd+bwd", fwd_bwd, args.repeat, n, "pts", impls)
        both("hashgrid", case + " fwd+bwd+dx", fwd_bwd_x, args.repeat, n, "pts", ("native",))
        if features == 2:
            bench_nerfstudio(args, spec, x, w, case)


def bench_nerfstudio(args, spec, x, w, case):
    try:
        from nerfstudio.field_components.encodings import HashEncoding
    except Exception as exc:  # noqa: BLE001 - any import failure means "not installed here"
        print(f"  nerfstudio not importable ({type(exc).__name__}): skipping the peer rows", file=sys.stderr)
        return
    enc = HashEncoding(num_levels=spec.levels, min_res=int(spec.base_resolution), max_res=int(spec.finest_resolution),
                       log2_hashmap_size=spec.log2_table, features_per_level=spec.features, implementation="torch")
    # nerfstudio's torch path is slow: time a slice and report its rate (it is linear in N)
    m = min(x.shape[0], 2 ** 16)
    xs, ws = x[:m], w[:m]

    def fwd():
        with torch.no_grad():
            enc(xs)

    def fwd_bwd():
        enc.zero_grad(set_to_none=True)
        (enc(xs) * ws).sum().backward()

    row("hashgrid", case + " fwd", "nerfstudio", timeit(fwd, max(1, args.repeat // 2)), m, "pts")
    row("hashgrid", case + " fwd+bwd", "nerfstudio", timeit(fwd_bwd, max(1, args.repeat // 2)), m, "pts")


# ---------------------------------------------------------------- batched small grids
def bench_hashgrid_batched(args):
    from talkcli.ops.hashgrid_batched import batched_hash_encode
    from talkcli.ops.hashspec import HashGridSpec

    spec = HashGridSpec(dims=3, levels=2, features=4, log2_table=8, base_resolution=32, finest_resolution=64)
    g = torch.Generator().manual_seed(1)
    v, m, q = 2000, 5, 2 ** 17
    tables = ((torch.rand(v, m, spec.n_entries, spec.features, generator=g) - 0.5) * 2e-4).requires_grad_()
    x = torch.rand(q, 3, generator=g).requires_grad_()
    item = torch.randint(0, v, (q,), generator=g)
    w = torch.randn(q, m, spec.output_dim, generator=g)
    case = f"Q=2^17 V{v} M{m} L2 F4 T8"

    def fwd():
        with torch.no_grad():
            batched_hash_encode(x, item, tables, spec)

    def fwd_bwd():
        tables.grad = x.grad = None
        (batched_hash_encode(x, item, tables, spec) * w).sum().backward()

    both("hashgrid_batched", case + " fwd", fwd, args.repeat, q, "queries")
    both("hashgrid_batched", case + " fwd+bwd", fwd_bwd, args.repeat, q, "queries")


# ---------------------------------------------------------------- ray marching
def _camera_rays(res: int, distance: float = 2.5):
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, res), torch.linspace(-1, 1, res), indexing="ij")
    d = torch.stack([xs * 0.45, ys * 0.45, -torch.ones_like(xs)], -1).reshape(-1, 3)
    d = d / d.norm(dim=-1, keepdim=True)
    o = torch.tensor([0.0, 0.0, distance]).expand_as(d).contiguous()
    return o, d


def bench_raymarch(args):
    from talkcli.ops.raymarch import OccupancyGrid, OccupancySpec, march_rays, ray_aabb

    spec = OccupancySpec(resolution=128)
    o, d = _camera_rays(64)
    step = math.sqrt(3) * 2 / 1024
    for case, fill in (("4096 rays sphere r0.5", "sphere"), ("4096 rays all occupied", "all")):
        grid = OccupancyGrid(spec)
        r = spec.resolution
        c = (torch.arange(r) + 0.5) / r * 2 - 1
        zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
        dens = ((xx ** 2 + yy ** 2 + zz ** 2) < 0.25).float() if fill == "sphere" else torch.ones(r, r, r)
        grid.density.copy_(dens)
        grid.pack()
        near, far = ray_aabb(o, d, spec.aabb)
        jitter = torch.rand(o.shape[0], generator=torch.Generator().manual_seed(2))
        with use_backend("native"):
            samples = march_rays(o, d, near, far, grid, step, 1024, jitter=jitter)
        count = int(samples.ts.shape[0])

        def run():
            march_rays(o, d, near, far, grid, step, 1024, jitter=jitter)

        both("raymarch", f"{case} ({count} samples)", run, args.repeat, o.shape[0], "rays")


# ---------------------------------------------------------------- compositing
def bench_composite(args):
    from talkcli.ops.composite import composite

    g = torch.Generator().manual_seed(3)
    r = 4096
    counts = torch.randint(0, 129, (r,), generator=g)
    offsets = torch.zeros(r + 1, dtype=torch.long)
    offsets[1:] = counts.cumsum(0)
    s = int(offsets[-1])
    sigmas = (torch.rand(s, generator=g) * 40).requires_grad_()
    rgbs = torch.rand(s, 3, generator=g).requires_grad_()
    deltas = torch.full((s,), 2 / 128)
    ts = torch.rand(s, generator=g)
    gr, go, gd = torch.randn(r, 3, generator=g), torch.randn(r, generator=g), torch.randn(r, generator=g)
    case = f"R=4096 S={s}"

    def fwd():
        with torch.no_grad():
            composite(sigmas, rgbs, deltas, ts, offsets)

    def fwd_bwd():
        sigmas.grad = rgbs.grad = None
        out = composite(sigmas, rgbs, deltas, ts, offsets)
        ((out.rgb * gr).sum() + (out.opacity * go).sum() + (out.depth * gd).sum()).backward()

    both("composite", case + " fwd", fwd, args.repeat, s, "samples")
    both("composite", case + " fwd+bwd", fwd_bwd, args.repeat, s, "samples")


# ---------------------------------------------------------------- k-NN
def bench_knn(args):
    from talkcli.ops.knn import KnnGridSpec, build_knn_grid, knn_brute, knn_query

    g = torch.Generator().manual_seed(4)
    v, n = 2000, 2 ** args.log2_points
    # a face-like cap: points on part of an ellipsoid of ~0.1 m
    theta = torch.rand(v, generator=g) * 2.2 - 1.1
    phi = torch.rand(v, generator=g) * 2.6 - 1.3
    verts = torch.stack([0.075 * torch.sin(theta) * torch.cos(phi), 0.1 * torch.sin(phi),
                         0.09 * torch.cos(theta) * torch.cos(phi)], -1)
    pick = torch.randint(0, v, (n,), generator=g)
    pts = verts[pick] + (torch.rand(n, 3, generator=g) - 0.5) * 0.04
    spec = KnnGridSpec()

    def build():
        build_knn_grid(verts, spec)

    both("knn", f"build V{v} 64^3 K'12", build, args.repeat, 64 ** 3, "cells")
    grid = build_knn_grid(verts, spec)

    def query():
        knn_query(pts, verts, grid, k=3)

    def brute():
        knn_brute(pts, verts, 3)

    both("knn", f"query N=2^{args.log2_points} hierarchical", query, args.repeat, n, "pts")
    both("knn", f"query N=2^{args.log2_points} brute force", brute, max(1, args.repeat // 2), n, "pts",
         ("native",))


BENCHES = {"hashgrid": bench_hashgrid, "hashgrid_batched": bench_hashgrid_batched, "raymarch": bench_raymarch,
           "composite": bench_composite, "knn": bench_knn}


def table() -> str:
    lines = ["| op | case | impl | time (ms) | rate | vs reference | vs nerfstudio |", "|---|---|---|---:|---:|---:|---:|"]
    for r in ROWS:
        peers = {p["impl"]: p for p in ROWS if p["op"] == r["op"] and p["case"] == r["case"]}
        ratio = lambda peer: (f"{r['rate'] / peers[peer]['rate']:.1f}x"  # noqa: E731
                              if peer in peers and r["impl"] != peer else "")
        lines.append(f"| {r['op']} | {r['case']} | {r['impl']} | {r['seconds'] * 1e3:.1f} | "
                     f"{r['rate'] / 1e6:.3f} M {r['unit']}/s | {ratio('reference')} | {ratio('nerfstudio')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="*", default=list(BENCHES), choices=list(BENCHES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--log2-points", type=int, default=18)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="fewer cases (for a smoke run)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _native.load("cpu")  # build before timing anything
    for op in args.ops:
        print(f"{op}:", file=sys.stderr)
        BENCHES[op](args)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cpu += f" ({vector_isa()})"
    print(f"Machine: {cpu}, {args.threads} threads, torch {torch.__version__}; {date.today()}; "
          f"command: python bench/kernels.py {' '.join(sys.argv[1:])}\n")
    print(table())
    if args.json:
        args.json.write_text(json.dumps({"date": str(date.today()), "cpu": cpu, "threads": args.threads,
                                         "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
