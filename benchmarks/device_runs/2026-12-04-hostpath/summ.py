import collections, sys
for f in sys.argv[1:]:
    byth = collections.Counter(); busy = collections.Counter(); leaf = collections.Counter()
    for line in open(f):
        stack, n = line.rsplit(" ", 1); n = int(n); fr = stack.split(";")
        th = fr[0].split(":")[-1].strip() if ":" in fr[0] else fr[0]
        byth[th] += n
        if "wait (threading" not in fr[-1] and "acquire" not in fr[-1] and "synchronize" not in fr[-1]:
            busy[th] += n; leaf[(th, fr[-1][:100])] += n
    print("==", f); print("samples", dict(byth)); print("busy", dict(busy))
    for k, v in leaf.most_common(30): print(v, k)
