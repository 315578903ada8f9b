import json, glob, os, statistics as st
R = {}
for p in glob.glob('/tmp/dev12/results/*.json'):
    r = json.load(open(p)); name = os.path.basename(p)[:-5]
    R[name] = r
uni = {r['seed']: r['final']['clean'] for n, r in R.items() if r['variant'] == 'uniform' and n.count('-') == 1}
rows = {}
for n, r in sorted(R.items()):
    v = r['variant'] + ('(rerun)' if n.count('-') > 1 else ''); s = r['seed']
    rf = r.get('refit', {})
    d = r['final']['clean'] - uni[s] if s in uni else float('nan')
    tr_ess = min(rf.get('stage/ess_min', [float('nan')])) if rf.get('stage/ess_min') else float('nan')
    rf_ess = min(rf.get('ess_min', []) + rf.get('ess_after', [])) if rf.get('ess_min') else float('nan')
    dead = int(sum(rf.get('dead', []))) if rf.get('dead') else 0
    gain = st.mean(rf['lookahead_gain']) if rf.get('lookahead_gain') else float('nan')
    ws = [x for x in r.get('stage_weight_std', []) if x is not None]
    rows.setdefault(v, []).append((s, n, d, r['final']['clean'], tr_ess, rf_ess, dead, r['wall'], len(rf.get('dead', [])), gain, sum(ws)/max(len(ws),1)))
print(f"{'run':14s} {'clean':>8s} {'delta':>8s} {'minESStrain':>11s} {'minESSrefit':>11s} {'dead':>5s} {'wall':>6s} {'lagain':>8s} {'wstd':>6s}")
for v, lst in rows.items():
    for s, n, d, c, te, re_, dead, w, nref, g, ws in sorted(lst):
        print(f"{n:14s} {c:8.4f} {d:+8.4f} {te:11.3f} {re_:11.3f} {dead:>2d}/{nref:<2d} {w:6.0f} {g:8.5f} {ws:6.3f}")
    ds = [x[2] for x in lst]
    if v != 'uniform':
        print(f"  {v}: mean {st.mean(ds):+.4f} sd {st.pstdev(ds):.4f}  better {sum(1 for x in ds if x < 0)}/{len(ds)}  worst {max(ds):+.4f}")
