import json, subprocess, statistics, sys
F="/work/main/target/release/fulcrum"
T={"direct":19301,"plain":19302,"busy1":19304,"busy2":19306}
pids={k:open(f"/tmp/fl/stack/{f}.pid").read().strip() for k,f in (("plain","r1"),("busy1","r2"),("busy2","r3"))}
def cpu(k):
    if k not in pids: return 0
    f=open(f"/proc/{pids[k]}/stat").read().split()
    return int(f[13])+int(f[14])
modes={"seq":["--closed-loop","1"],"1000":["--rps","1000","--connections","4"],"5000":["--rps","5000","--connections","4"]}
rounds=int(sys.argv[1]) if len(sys.argv)>1 else 4
res={}
for m,args in modes.items():
    for r in range(rounds):
        for k,port in T.items():
            c0=cpu(k)
            d=json.loads(subprocess.run([F,"load","--target",f"127.0.0.1:{port}","--duration","2s","--json"]+args,capture_output=True,text=True).stdout)
            c1=cpu(k)
            l=d["latency"]
            res.setdefault((m,k),[]).append((l["p50_us"],l["p99_us"],l["p999_us"],(c1-c0)/2/100,d["achieved_rps"]))
for m in modes:
    dp50=statistics.median(x[0] for x in res[(m,"direct")]); dp99=statistics.median(x[1] for x in res[(m,"direct")])
    for k in T:
        xs=res[(m,k)]
        p50=statistics.median(x[0] for x in xs); p99=statistics.median(x[1] for x in xs); p999=statistics.median(x[2] for x in xs)
        print(f"{m:5} {k:7} p50 {p50:6.0f} (+{p50-dp50:4.0f}) p99 {p99:6.0f} (+{p99-dp99:5.0f}) p999 {p999:6.0f} cores {statistics.median(x[3] for x in xs):.2f} rps {statistics.median(x[4] for x in xs):.0f}  p50s {[x[0] for x in xs]}")
