#!/usr/bin/env bash
# A/B the CPU hash-grid kernel of up to four git revisions in one process (see hashgrid_ab.cpp).
#   bench/hashgrid_ab.sh fwd HEAD~1 HEAD          # forward, T = 19
#   T=14 REPEAT=60 bench/hashgrid_ab.sh bwdx HEAD~1 HEAD
#   CXXFLAGS_EXTRA=-mno-avx512f bench/hashgrid_ab.sh fwd HEAD~1 HEAD   # the AVX2 path
# "WORKTREE" as a revision means the file as it is on disk.
set -euo pipefail
what=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
flags="-O3 -march=native -fopenmp -fno-math-errno -fno-ipa-modref -std=c++17 ${CXXFLAGS_EXTRA:-}"
objs=()
k=0
for rev in "$@"; do
  src=$tmp/hashgrid_$k.cpp
  if [ "$rev" = WORKTREE ]; then cp "$root/kernels/cpu/hashgrid.cpp" "$src"
  else git -C "$root" show "$rev:kernels/cpu/hashgrid.cpp" > "$src"; fi
  c++ $flags -I"$root/kernels" -Dtk_hashgrid_forward_cpu=fwd_$k -Dtk_hashgrid_backward_cpu=bwd_$k \
    -c "$src" -o "$tmp/b$k.o"
  echo "build $k: $rev"
  objs+=("$tmp/b$k.o")
  k=$((k + 1))
done
c++ $flags -I"$root/kernels" "$root/bench/hashgrid_ab.cpp" "${objs[@]}" -o "$tmp/ab"
"$tmp/ab" "$k" "$what" "${T:-19}" "${REPEAT:-40}"
