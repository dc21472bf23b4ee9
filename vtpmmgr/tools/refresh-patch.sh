#!/bin/sh
# Regenerate patches/0001-vtpmmgr-checkpoint-extension.patch after editing src/: the patch's changes
# to Xen's files are kept (edit them by hand in the patch, or in the temporary tree this prints with
# KEEP=1), the extension's files are taken from src/.  Needs Xen's source (tools/fetch-xen-source.sh).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
patch_file="$here/patches/0001-vtpmmgr-checkpoint-extension.patch"
xen=$("$here/tools/fetch-xen-source.sh" "${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xen-vtpm}")
tmp=$(mktemp -d)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/stubdom"
cp -r "$xen/stubdom/vtpmmgr" "$tmp/stubdom/"
cd "$tmp"
git init -q
git add -A
git -c user.name=base -c user.email=base@example.invalid commit -qm "Xen 4.17 stubdom/vtpmmgr"
git -c user.name=base -c user.email=base@example.invalid am -q "$patch_file"
cp "$here"/src/*.c "$here"/src/*.h stubdom/vtpmmgr/
git add -A
git -c user.name=base -c user.email=base@example.invalid commit -q --amend --no-edit
git format-patch -1 --stdout > "$patch_file"
echo "wrote $patch_file${KEEP:+ (tree kept in $tmp)}"
