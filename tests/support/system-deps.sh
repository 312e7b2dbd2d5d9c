#!/usr/bin/env bash
# Install the Debian packages the tests use (espeak-ng, chromium, poppler-utils, dcmtk) when they are missing and apt can install them.
# Never fatal: a test whose tool is absent skips with a visible reason.
set -u
need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v pdftoppm >/dev/null 2>&1 || need+=(poppler-utils)   # PDF pages as PNG in report tests
command -v dsrdump >/dev/null 2>&1 || need+=(dcmtk)            # independent DICOM SR reader
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${need[*]} and apt is not usable here; the tests that need them will skip" >&2
  exit 0
fi
echo "system-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
(apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}") >/tmp/mmcore-apt.log 2>&1 \
  || echo "system-deps: apt-get install ${need[*]} failed (see /tmp/mmcore-apt.log); dependent tests will skip" >&2
exit 0
