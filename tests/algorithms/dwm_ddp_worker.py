"""Worker for ``test_dwm_ddp.py``: run under ``composer -n N`` (or alone for the 1-rank reference).

Usage: ``composer -n 2 dwm_ddp_worker.py OUT_DIR``. Writes ``OUT_DIR/rank{r}.pt`` with the weighter parameters after
training, the global (uid, weight) pairs of every batch, the losses, and the weights of a fixed global batch under
a fixed perturbed weighter computed through the split/all-gather path.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from composer import Trainer  # noqa: E402
from composer.core import Callback, Event  # noqa: E402
from composer.loggers import InMemoryLogger  # noqa: E402
from composer.utils import dist  # noqa: E402
from dwm_testing import ToyCorpus, composer_llama, val_batches  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from algorithms.dwm import DWM, Weighter, WeighterConfig  # noqa: E402
from algorithms.dwm.distributed import all_gather_cat  # noqa: E402
from algorithms.dwm.refit import global_weights  # noqa: E402

GLOBAL_BATCH = 8


class RankSlices:
    """Each rank's interleaved share of fixed global batches (re-iterable, deterministic)."""

    def __init__(self, global_batches):
        self.global_batches = global_batches

    def __iter__(self):
        rank, world = dist.get_global_rank(), dist.get_world_size()
        for batch in self.global_batches:
            yield {k: v[rank::world] for k, v in batch.items()}


class Record(Callback):

    def __init__(self, dwm):
        self.dwm, self.rows = dwm, []

    def run_event(self, event, state, logger):
        if event == Event.BATCH_START:
            uids, _ = all_gather_cat(state.batch['uid'])
            self.rows.append((uids.clone(), self.dwm.last_weights.clone()))


def fixed_batch_weights():
    weighter = Weighter(WeighterConfig(vocab_size=128, d_model=16, n_heads=2, n_layers=1, seed=4))
    with torch.no_grad():
        weighter.score_head.weight.normal_(generator=torch.Generator().manual_seed(9), std=2.0)
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 128, (12, 10), generator=gen)
    rank, world = dist.get_global_rank(), dist.get_world_size()
    local = {'input_ids': ids[rank::world], 'prior_weight': torch.linspace(0.5, 1.5, 12)[rank::world]}
    with torch.no_grad():
        weights, offset, _ = global_weights(weighter, local)
    order = torch.cat([torch.arange(12)[r::world] for r in range(world)])
    out = torch.empty(12)
    out[order] = weights
    return out


def main(out_dir, lookahead_steps=(1,)):
    """One run per ``lookahead_steps`` value, one after another in this process (one launch, one import of torch
    and Composer for all of them); each writes ``rank{r}-K{k}.pt``."""
    dist.initialize_dist('cpu')
    for k in lookahead_steps:
        run(out_dir, k)


def run(out_dir, lookahead_steps):
    world = dist.get_world_size()
    refit_global = list(DataLoader(ToyCorpus(48, seed=1), batch_size=GLOBAL_BATCH, shuffle=False))
    val_global = val_batches(n_batches=3, batch_size=4)
    dwm = DWM(stage_boundaries=['2ba'], refit_steps=3, refit_lr=0.05, lookahead_lr=0.5,
              refit_dataloader=RankSlices(refit_global), val_dataloader=RankSlices(val_global),
              lookahead_steps=lookahead_steps, weighter={'d_model': 16, 'n_heads': 2, 'n_layers': 1})
    dataset = ToyCorpus(64, seed=0)
    train = DataLoader(dataset, batch_size=GLOBAL_BATCH // world, sampler=dist.get_sampler(dataset, shuffle=False))
    model = composer_llama()
    record = Record(dwm)
    logger = InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=train, max_duration='3ba', algorithms=[dwm], callbacks=[record],
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1), device='cpu', seed=17, loggers=[logger],
                      progress_bar=False, log_to_console=False)
    trainer.fit()
    torch.save({
        'weighter': {k: v.detach().clone() for k, v in dwm.weighter.state_dict().items()},
        'rows': record.rows,
        'losses': [float(v) for _, v in logger.data['loss/train/total']],
        'fixed_batch_weights': fixed_batch_weights(),
        'world_size': world,
        'refits': dwm.refits_done,
    }, os.path.join(out_dir, f'rank{dist.get_global_rank()}-K{lookahead_steps}.pt'))


if __name__ == '__main__':
    main(sys.argv[1], [int(k) for k in sys.argv[2].split(',')] if len(sys.argv) > 2 else (1,))
