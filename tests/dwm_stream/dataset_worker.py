"""Run by tests in a fresh process (plain, or under `composer -n 2`): iterate a DWMDataset and
write what was delivered as JSON.

Usage: python dataset_worker.py JOBS_JSON OUT_PREFIX
JOBS_JSON: a list of jobs, run one after another in this process (each dataset released before the next; one process
start, not one per job), job i writing OUT_PREFIX.job{i}.rank{rank}.json. A job's keys: dataset (kwargs for
DWMDataset), num_workers, batch_size, take (stop after this many samples, per rank; -1 for all), state_in (path of a
state dict to resume from), state_out (write dataset.state_dict(take * world, True) here after `take` samples).
"""

import gc
import json
import os
import sys

import torch.distributed as dist
from torch.utils.data import DataLoader

from dwm_stream.data.dataset import DWMDataset
from dwm_stream.data.loader import collate_samples


def run_job(cfg: dict, out_path: str, rank: int, world_size: int) -> None:
    dataset = DWMDataset(**cfg['dataset'])
    if cfg.get('state_in'):
        with open(cfg['state_in']) as f:
            dataset.load_state_dict(json.load(f))
    loader = DataLoader(dataset, batch_size=cfg['batch_size'], num_workers=cfg.get('num_workers', 0),
                        collate_fn=collate_samples, drop_last=False)
    take = cfg.get('take', -1)
    uids, priors = [], []
    for batch in loader:
        uids += batch['uid'].tolist()
        priors += batch['prior_weight'].tolist()
        if 0 <= take <= len(uids):
            break
    if take >= 0:
        uids, priors = uids[:take], priors[:take]
    if cfg.get('state_out') and rank == 0:
        state = dataset.state_dict(take * world_size, True)
        with open(cfg['state_out'], 'w') as f:
            json.dump(state, f)
    with open(out_path, 'w') as f:
        json.dump({'uids': uids, 'prior_weight': priors, 'world_size': world_size,
                   'domain_names': dataset.domain_names}, f)


def main() -> None:
    jobs = json.loads(sys.argv[1])
    out_prefix = sys.argv[2]
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    if world_size > 1:
        dist.init_process_group('gloo')
    for i, cfg in enumerate(jobs):
        run_job(cfg, f'{out_prefix}.job{i}.rank{rank}.json', rank, world_size)
        gc.collect()  # the job's dataset (its shared memory) is released before the next one is built
        if world_size > 1:
            dist.barrier()
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
