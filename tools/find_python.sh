#!/usr/bin/env bash
# Print the path of a Python >= 3.12 (3.12 preferred: the GPU image runs 3.12), PATH first, then pyenv.
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
for c in python3.12 python3.13 python3 python; do
  p=$(command -v "$c" 2>/dev/null) && ok "$p" && { echo "$p"; exit 0; }
done
for root in "${PYENV_ROOT:-$HOME/.pyenv}" /root/.pyenv /usr/local/pyenv; do
  for p in $(ls -d "$root"/versions/3.1[2-9]*/bin/python 2>/dev/null | sort -V); do
    ok "$p" && { echo "$p"; exit 0; }
  done
done
echo "error: no Python >= 3.12 found (looked on PATH and in pyenv); install one, e.g. 'pyenv install 3.12'" >&2
exit 1
