"""Run by tests in a fresh process (plain, or under `composer -n 2`): iterate a DWMDataset and
write what was delivered as JSON.

Usage: python dataset_worker.py CONFIG_JSON OUT_PREFIX
CONFIG_JSON keys: dataset (kwargs for DWMDataset), num_workers, batch_size, take (stop after this
many samples, per rank; -1 for all), state_in (path of a state dict to resume from), state_out
(write dataset.state_dict(take * world, True) here after `take` samples).
"""

import json
import os
import sys

import torch.distributed as dist
from torch.utils.data import DataLoader

from dwm_stream.data.dataset import DWMDataset
from dwm_stream.data.loader import collate_samples


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out_prefix = sys.argv[2]
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    if world_size > 1:
        dist.init_process_group('gloo')
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
    with open(f'{out_prefix}.rank{rank}.json', 'w') as f:
        json.dump({'uids': uids, 'prior_weight': priors, 'world_size': world_size,
                   'domain_names': dataset.domain_names}, f)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
