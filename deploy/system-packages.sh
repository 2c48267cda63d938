#!/usr/bin/env bash
# Debian packages used by tests and benchmarks: a real SLURM (slurmctld, slurmd, client, munge),
# fitsverify (FITS export check) and source-extractor (the SExtractor reference in benchmarks).
# Installs only what is missing; as non-root it says what it would need and carries on.
set -u
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd >/dev/null || need+=(slurmd)
command -v sbatch >/dev/null || need+=(slurm-client)
command -v munged >/dev/null || need+=(munge)
command -v fitsverify >/dev/null || need+=(fitsverify)
command -v source-extractor >/dev/null || need+=(source-extractor)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != "0" ]; then
  echo "system-packages: not root; missing Debian packages: ${need[*]} (tests that need them will skip and say why)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || echo "system-packages: apt-get could not install ${need[*]}"
exit 0
