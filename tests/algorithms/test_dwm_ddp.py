"""World-size invariance under real processes: ``composer -n 2`` (gloo on CPU) against one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name('dwm_ddp_worker.py')
REPO = Path(__file__).resolve().parents[2]
COMPOSER = Path(sys.executable).with_name('composer')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


LOOKAHEAD_STEPS = (1, 2)


def _launch(nproc, out_dir, lookahead_steps=LOOKAHEAD_STEPS):
    """One launch of ``nproc`` ranks that runs every ``lookahead_steps`` in turn; ``{k: [rank 0's, rank 1's...]}``."""
    out_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''),
               OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    args = [str(WORKER), str(out_dir), ','.join(map(str, lookahead_steps))]
    if nproc == 1:  # the reference: one plain process (the launcher would cost one more import of Composer)
        cmd = [sys.executable, *args]
    else:
        cmd = [str(COMPOSER), '-n', str(nproc), '--master_port', str(_free_port()),
               '--stdout', str(out_dir / 'stdout{rank}.txt'), '--stderr', str(out_dir / 'stderr{rank}.txt'), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return {k: [torch.load(out_dir / f'rank{r}-K{k}.pt', weights_only=False) for r in range(nproc)]
            for k in lookahead_steps}


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Two ranks and one rank, each launched once for every ``lookahead_steps``."""
    root = tmp_path_factory.mktemp('ddp')
    return _launch(2, root / 'two'), _launch(1, root / 'one')


def _by_uid(uids, weights):
    order = torch.argsort(uids)
    return uids[order], weights[order]


@pytest.mark.slow
@pytest.mark.parametrize('lookahead_steps', LOOKAHEAD_STEPS)
def test_two_ranks_match_one_rank(runs, lookahead_steps):
    two = runs[0][lookahead_steps]
    one = runs[1][lookahead_steps][0]
    assert two[0]['world_size'] == 2 and one['world_size'] == 1
    assert two[0]['refits'] == two[1]['refits'] == one['refits'] == 2

    # Identical weighters on both ranks after refits (exactly), and equal to the 1-rank weighter up to rounding
    # (gradients are summed in another order; Adam's normalisation turns ~1e-7 differences in near-zero gradients into ~1e-4 steps).
    for name, value in two[0]['weighter'].items():
        assert torch.equal(value, two[1]['weighter'][name]), name
        torch.testing.assert_close(value, one['weighter'][name], rtol=0, atol=2e-3, msg=name)

    # The weights of the same global batch do not depend on the world size.
    for (u2, w2), (u1, w1) in zip(two[0]['rows'], one['rows']):
        u2, w2 = _by_uid(u2, w2)
        u1, w1 = _by_uid(u1, w1)
        assert torch.equal(u2, u1)
        torch.testing.assert_close(w2, w1, rtol=1e-5, atol=1e-5)
    assert two[0]['rows'][0][1].std() > 1e-3  # refit moved them off uniform
    torch.testing.assert_close(two[0]['losses'], one['losses'], rtol=1e-5, atol=0)

    # A fixed weighter on a fixed global batch through the all-gather path: same weights on 1 and 2 ranks.
    torch.testing.assert_close(two[0]['fixed_batch_weights'], one['fixed_batch_weights'], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(two[1]['fixed_batch_weights'], one['fixed_batch_weights'], rtol=1e-6, atol=1e-6)
