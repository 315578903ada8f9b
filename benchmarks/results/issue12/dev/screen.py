"""Dev screening for issue 12: one (variant, seed) run of benchmarks.quality.run_one on the DEV corpus."""
import json, sys, time
from dataclasses import asdict
sys.path.insert(0, '/work/wt12')
from benchmarks import quality as q

CORPUS_SEED = 7
VARIANTS = {
    'uniform': ('uniform', {}),
    'b0': ('dwm', {}),
    'b1': ('dwm', {'refit_kl': 1.0}),
    'b3': ('dwm', {'refit_kl': 3.0}),
    'b10': ('dwm', {'refit_kl': 10.0}),
    'b1n': ('dwm', {'refit_kl': 1.0, 'embed_norm': 'batch'}),
    'b3n': ('dwm', {'refit_kl': 3.0, 'embed_norm': 'batch'}),
    'b10n': ('dwm', {'refit_kl': 10.0, 'embed_norm': 'batch'}),
    'b3l': ('dwm', {'refit_kl': 3.0, 'embed_norm': 'layernorm'}),
    'b3s': ('dwm', {'refit_kl': 3.0, 'refit_backbone_lr_scale': 0.1}),
    'b0n': ('dwm', {'embed_norm': 'batch'}),
    'b3nv4': ('dwm', {'refit_kl': 3.0, 'embed_norm': 'batch', 'val_batches_per_step': 4}),
    'b3v4': ('dwm', {'refit_kl': 3.0, 'val_batches_per_step': 4}),
    # controls: the refit replaced by a random score head (seeded per stage) at a given scale: random weights
    # with the same machinery (embed_norm='batch' keeps the per-sample spread), no hypergradient at all
    'rand05': ('dwm', {'embed_norm': 'batch', 'refit_steps': 1}),
    'rand10': ('dwm', {'embed_norm': 'batch', 'refit_steps': 1}),
    'rand02': ('dwm', {'embed_norm': 'batch', 'refit_steps': 1}),
    'rand02b': ('dwm', {'embed_norm': 'batch', 'refit_steps': 1}),
}
HELDOUT = {'b3H', 'b3nH', 'b1nH', 'b10nH'}
VARIANTS.update({'b3H': ('dwm', {'refit_kl': 3.0}), 'b3nH': ('dwm', {'refit_kl': 3.0, 'embed_norm': 'batch'}),
                 'b1nH': ('dwm', {'refit_kl': 1.0, 'embed_norm': 'batch'}),
                 'b10nH': ('dwm', {'refit_kl': 10.0, 'embed_norm': 'batch'})})
RAND_STD = {'rand02b': 0.02, 'rand02': 0.02, 'rand05': 0.05, 'rand10': 0.10}


def _patch_random_refit(target_std, seed, offset=0):
    import torch
    from algorithms.dwm import dwm as D

    def _refit(self, state, logger):
        g = torch.Generator().manual_seed(1000 * seed + self.stage_index + offset)
        with torch.no_grad():
            head = self.weighter.score_head.weight
            d = head.numel()
            # LN(batch-layer output) has unit-variance features, so score std ~ std * sqrt(d); w - 1 ~ 0.9 * s
            head.copy_(torch.randn(head.shape, generator=g) * target_std / (0.9 * d ** 0.5))
        self.refits_done += 1
        logger.log_metrics({'dwm/refit/count': self.refits_done})
    D.DWM._refit = _refit

def main(variant, seed, tag=''):
    method, over = VARIANTS[variant]
    if variant in RAND_STD:
        _patch_random_refit(RAND_STD[variant], int(seed), 500 if variant.endswith('b') else 0)
    budget = q.Budget(**{**asdict(q.FULL), **over})
    paths = q.prepare_data('/tmp/dev12/data', q.FULL, corpus_seed=CORPUS_SEED)
    spec = {'paths': paths, 'budget': asdict(budget), 'threads': 1, 'method': method, 'seed': int(seed)}
    if variant in HELDOUT:  # upper level on held-out real-domain LM loss (samples the evaluation never reads)
        spec['dwm_validation'] = 'heldout'
        spec['heldout_selection'] = q.heldout_selection(paths, q.FULL)['path']
    t = time.time()
    r = q.run_one(spec)
    r['wall'] = time.time() - t
    r['variant'] = variant
    out = f'/tmp/dev12/results/{variant}-{seed}{tag}.json'
    with open(out, 'w') as f:
        json.dump(r, f)
    print('done', variant, seed, r['final']['clean'], r['wall'])

if __name__ == '__main__':
    if sys.argv[1] == 'prep':
        print(q.prepare_data('/tmp/dev12/data', q.FULL, corpus_seed=CORPUS_SEED))
    else:
        main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else '')
