# Sourced by the dev/gpu_*.sh scripts on the GPU machine: installs the carried wheels of
# dev/device_wheels.sh (if .whl/ is there) into /tmp/site and puts them and this checkout on PYTHONPATH.
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
