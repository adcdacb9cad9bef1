#!/usr/bin/env bash
# Installs what Braid builds and runs with, from Debian's packages: compiler and build tools,
# Open MPI, HDF5, yaml-cpp, nlohmann-json, OpenSSL (SHA-256), GoogleTest, the Python standard library sources
# (the corpus of the main job), and SLURM with munge (the test that runs a SLURM job on localhost).
# Installs only what is missing. Needs root (or sudo).
set -euo pipefail
pkgs=(g++ cmake ninja-build libopenmpi-dev openmpi-bin libhdf5-dev hdf5-tools libyaml-cpp-dev
      nlohmann-json3-dev libssl-dev libgtest-dev libpython3-stdlib slurmd slurmctld munge)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
