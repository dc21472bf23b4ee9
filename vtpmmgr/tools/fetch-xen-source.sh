#!/bin/sh
# Xen 4.17's stubdom/vtpmmgr from Debian's source package into CACHE/xen-4.17 (outside the
# repository: Xen's code is read and built here, never committed).  Idempotent; prints the directory.
#
#   tools/fetch-xen-source.sh CACHE
#
# Needs root the first time (a deb-src line derived from the machine's own apt sources).
set -eu
cache=${1:?usage: fetch-xen-source.sh CACHE}
dest="$cache/xen-4.17"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [ -f "$dest/.complete" ]; then
    echo "$dest"
    exit 0
fi

if ! apt-cache showsrc xen 2>/dev/null | grep -q '^Version: 4\.17\.'; then
    list=/etc/apt/sources.list.d/xen-vtpm-src.sources
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$list"
    else
        sed -n 's/^deb \(.*\)$/deb-src \1/p' /etc/apt/sources.list > /etc/apt/sources.list.d/xen-vtpm-src.list
    fi
    apt-get update -qq
fi

work="$cache/debian"
rm -rf "$work" "$dest.tmp"
mkdir -p "$work" "$dest.tmp"
# Newest 4.17 first; a mirror may lack one suite's files (a security upload), so try each version.
fetched=
for version in $(apt-cache showsrc xen | sed -n 's/^Version: \(4\.17\..*\)$/\1/p' | sort -rV | uniq); do
    if (cd "$work" && apt-get source --download-only -qq "xen=$version" >/dev/null 2>&1); then
        fetched=$version
        break
    fi
    rm -f "$work"/*
done
[ -n "$fetched" ] || { echo "fetch-xen-source: no Xen 4.17 source package could be downloaded" >&2; exit 1; }
orig=$(ls "$work"/xen_4.17*.orig.tar.* | sort -V | tail -n 1)
tar -xf "$orig" -C "$dest.tmp" --strip-components=1 --wildcards '*/stubdom/vtpmmgr/*'
basename "$orig" > "$dest.tmp/.source"
touch "$dest.tmp/.complete"
rm -rf "$dest" "$work"
mv "$dest.tmp" "$dest"
echo "$dest"
