#!/usr/bin/env bash
# device side: bash .gpu/apply.sh BRANCH  (run from the carried tree's root) -> /tmp/w/BRANCH
set -euo pipefail
b=$1; root=$PWD; dst=/tmp/w/$b
rm -rf $dst; mkdir -p $dst
tar -cf - --exclude=./.whl --exclude=./.whl-k --exclude=./.whl-dyn --exclude=./.gpu --exclude=./.devdata --exclude=./.anchors . | tar -xf - -C $dst
tar -xzf $root/.gpu/$b.tgz -C $dst
while read -r f; do [ -n "$f" ] && rm -f "$dst/$f"; done < $root/.gpu/$b.deleted
for d in .whl .whl-k .whl-dyn .devdata .anchors; do [ -e $root/$d ] && ln -sfn $root/$d $dst/$d; done
echo $dst
