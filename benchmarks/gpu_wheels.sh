#!/usr/bin/env bash
# Fetch, into .whl/ (ignored by git), the pure-Python wheels ppvi needs on the device machine beyond what its image
# holds (torch, numpy, scipy, pandas, xarray, matplotlib, scikit-learn, tqdm are there; these are not). Run once in
# the repository's root, where pip reaches PyPI; then each device call carries .whl (see benchmarks/README.md,
# "GPU check"). Versions: those of the development environment.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pyro-ppl==1.9.2 pyro-api==0.1.2 arviz==0.23.4 xarray-einstats==0.9.1 h5netcdf==1.8.2 platformdirs==4.14.8
ls .whl
