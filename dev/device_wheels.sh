#!/usr/bin/env bash
# Wheels that the GPU machine lacks (it has torch, torchvision, timm, pandas, matplotlib, tqdm,
# pytest, ... but not pydicom or the notebook stack), for Python 3.12 on x86-64, into .whl/ (ignored
# by git; name it in the device tool's `carry`). dev/gpu_checks.sh and dev/gpu_paper.sh install
# them with pip --target when .whl/ exists. Run from the repository root on a machine with pip access.
set -eu
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl pydicom papermill ipykernel nbclient nbformat
# already on the GPU machine's image: two versions of one package would break the install there
cd .whl && rm -f attrs-* certifi-* charset_normalizer-* click-* idna-* packaging-* psutil-* pygments-* \
  python_dateutil-* pyyaml-* requests-* tqdm-* typing_extensions-* urllib3-*
ls | wc -l
