#!/usr/bin/env bash
# The installed package works outside the repository (run by hand: make check-install;
# slow, needs the package index): `pip install .` into a fresh venv, then, from an
# empty folder, `python -m nl_jax bench optimizers`.  What is installed is what git
# would ship (tracked and untracked-but-not-ignored files), copied to a temp folder
# so that the build leaves nothing in the checkout.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
start=$(date +%s)

mkdir "$TMP/src" "$TMP/elsewhere"
git -C "$REPO" ls-files -z -co --exclude-standard \
  | (cd "$REPO" && xargs -0 -I{} sh -c 'test -f "{}" && printf "%s\0" "{}"' ) \
  | (cd "$REPO" && tar --null -T - -cf -) | tar -xf - -C "$TMP/src"
rm -rf "$TMP/src/experiments"        # the library must not need it, even to build

"$PYTHON" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$TMP/src"
echo "check-install: installed in $(( $(date +%s) - start ))s"

cd "$TMP/elsewhere"
"$TMP/venv/bin/python" - "$TMP/venv" <<'PY'
import importlib.util, sys
import nl_jax, nl_jax_kernels.linear_memory
venv = sys.argv[1]
for module in (nl_jax, nl_jax_kernels.linear_memory):
    assert module.__file__.startswith(venv), module.__file__
for name in ("experiments", "kernels"):   # nothing of the checkout, no top-level kernels
    assert importlib.util.find_spec(name) is None, name
print("check-install: nl_jax and nl_jax_kernels import from the venv; no experiments, "
      "no top-level kernels")
PY
"$TMP/venv/bin/python" -m nl_jax bench optimizers | tee "$TMP/bench.txt"
for name in adamw muon m3 delta_momentum dmgd; do
  grep -q "^$name " "$TMP/bench.txt" || { echo "check-install: no row for $name"; exit 1; }
done
echo "check-install: OK in $(( $(date +%s) - start ))s"
