#!/usr/bin/env bash
# device side: bash .gpu/go.sh BRANCH -> runs .gpu/BRANCH.cmd in /tmp/w/BRANCH with OUT=/tmp/out/BRANCH, tars it into $OUT
root=$PWD; b=$1; c=$(cat .gpu/$b.commit); real=$OUT
d=$(bash .gpu/apply.sh $b) || { echo "apply failed"; exit 3; }
mkdir -p /tmp/out/$b
echo "== $b @ $c start $(date -u +%T)"
( cd $d && export OUT=/tmp/out/$b && sed "s/@@COMMIT@@/$c/g; s/COMMIT_HERE/$c/g" $root/.gpu/$b.cmd > /tmp/$b.sh && bash /tmp/$b.sh ); rc=$?
echo "== $b rc=$rc end $(date -u +%T)"
tar czf $real/$b.tgz -C /tmp/out $b
exit $rc
