#!/bin/sh
# Regenerate the patch series (patches/NNNN-*.patch) after an edit.
#
#   tools/refresh-patches.sh            src/ changed: apply the series to Xen's source in a temporary
#                                       git tree, replace the files each patch adds by src/'s, export
#   KEEP=1 tools/refresh-patches.sh     the same, and keep the tree (its path is printed) to change
#                                       the patches' hunks in Xen's own files: commit there (e.g.
#                                       `git commit --fixup=<patch>` then `git rebase -i --autosquash`)
#   EXPORT=TREE tools/refresh-patches.sh
#                                       export the commits of such a tree as the series
#
# Every file of src/ is added by exactly one patch and changed by none after it, so src/ is the
# series' own code as the last patch leaves it.  Needs Xen's source (tools/fetch-xen-source.sh).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
id="-c user.name=xen-vtpm -c user.email=xen-vtpm@users.noreply.invalid"

export_series() {
    tree=$1
    n=$(ls "$here"/patches/*.patch | wc -l)
    [ "$(git -C "$tree" rev-list --count HEAD)" -eq $((n + 1)) ] ||
        { echo "refresh-patches: $tree does not hold base + $n patches" >&2; exit 1; }
    i=$n
    for patch in $(ls "$here"/patches/*.patch | sort -r); do
        git -C "$tree" format-patch -1 "HEAD~$((n - i))" --stdout > "$patch"
        i=$((i - 1))
    done
    echo "wrote $n patches from $tree"
}

if [ -n "${EXPORT:-}" ]; then
    export_series "$EXPORT"
    exit 0
fi

xen=$("$here/tools/fetch-xen-source.sh" "${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xen-vtpm}")
tmp=$(mktemp -d)
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/stubdom"
cp -r "$xen/stubdom/vtpmmgr" "$tmp/stubdom/"
cd "$tmp"
git init -q
git add -A
# Fixed dates: a patch whose content did not change comes out byte for byte the same.
GIT_AUTHOR_DATE=2000-01-01T00:00:00Z GIT_COMMITTER_DATE=2000-01-01T00:00:00Z git $id commit -qm "Xen 4.17 stubdom/vtpmmgr"
for patch in $(ls "$here"/patches/*.patch | sort); do
    git $id am -q --committer-date-is-author-date "$patch"
    for file in $(git diff --name-only --diff-filter=A HEAD~1 HEAD); do
        cp "$here/src/$(basename "$file")" "$file"
    done
    git add -A
    GIT_COMMITTER_DATE=$(git log -1 --format=%aI) git $id commit -q --amend --no-edit
done
export_series "$tmp"
[ "${KEEP:-0}" = 1 ] && echo "tree kept in $tmp"
exit 0
