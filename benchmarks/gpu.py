"""The GPU benchmark: ``dwm-stream bench gpu`` (``python -m benchmarks.gpu``).

One command, at the user's model size (``--model 124m|370m``, ``--seq-len``, ``--batches``), measured side by side in
one process:

1. **Data**, with the project's own tools: the embedded SlimPajama-format corpus, a BPE tokenizer and MDS shards
   (``dwm_stream.demo.data.prepare_data``, cached under ``--data-dir``), and the convert rate at all cores.
2. **Training**: the shipped ``yamls/slimpajama-370m-random.yaml`` (uniform) and
   ``yamls/slimpajama-370m-random-dwm.yaml`` (DWM), scaled by overrides, through the project's own train entry point (``dwm_stream.train.entry``: the same
   ``load_config`` + ``build_trainer`` as ``dwm-stream train``), with everything else as shipped (``amp_bf16``, SDPA,
   ``compile_config``, the 512-wide weighter). DWM runs 3 stages, so it refits 3 times (at step 0 and at each
   boundary) inside the run. Reported: steady step time (median over the steps after the first
   quarter, refit steps excluded), tokens/s, MFU (bf16 dense peak of the GPU), peak memory, each refit's time.
3. **Plain PyTorch** (no Composer): a plain step, a DWM-weighted step and a refit step, alternated, on the same
   model, with the project's functional core (``weighted_loss``, ``hypergradient``, ``jvp_attention``,
   ``refit_objective``, ``Weighter``), and the peak memory of each; the refit in TF32 (as Composer sets it) and, on
   CUDA, strict fp32.
4. **The refit's JVP memory**: the JVP peak with the attention over query blocks (``jvp_attention``'s rule) and in
   one block, measured at the run's shape, beside the analytic model (``jvp_memory_model``) there and at the 370M
   YAML's.
5. **Loader** at 1, 2, 4 and 8 DataLoader workers: ``DWMDataset`` against the do-nothing DataLoader at seq 2048, and
   directly iterated against a plain ``StreamingDataset`` (``benchmarks.loader_throughput``'s pieces).

It writes ``results/gpu.json`` and the GPU section of ``benchmarks/RESULTS.md`` (machine, library versions, every
ratio, the issue's targets, met or not).

**Without a CUDA device** it prints a note and runs the dry run instead (rc 0): a user who types ``bench gpu`` on a
laptop learns at once that the figures need a GPU, and still sees every part run. A dry run never writes into the
checkout's ``benchmarks/results`` or ``RESULTS.md`` unless ``--out`` names them: without ``--out`` it writes to a new
temporary directory, so the committed GPU record is only ever replaced by a GPU run.

**``--dry-run``** shrinks everything to run on CPU in well under 2 minutes (CI runs it and checks the JSON): a
2 x 64 Llama at seq 64, 12 batches of 8, 3 refits of 1 step, a 32-wide weighter, no ``torch.compile``, the loader
at 1 and 2 workers over 256 samples, the JVP memory at seq 2048 with a 64-wide model.

**Eight minutes on one H200, by construction** (the default ``--model 124m``: seq 1024, 60 batches of 32,
microbatch 16): the data is 4 MB of text (about 1M tokens: under 40 s to build and convert on 16 cores, cached
after); each training run is 60 steps of 32 x 1024 tokens (about 0.2 s each at the issue's 185k tok/s, 12 s) plus
``torch.compile`` (about a minute), and DWM's 3 refits of 20 steps (about 0.4 s each, 25 s); the plain-PyTorch part
is 5 alternated repetitions of three steps plus 2 refit variants (under 20 s); the JVP memory, 4 JVPs; the loader,
4 worker counts x 2 loaders x 3 repetitions of 2,048 samples (under 60 s). About 5 minutes in all. ``--model 370m``
(seq 2048) keeps 60 batches of 32 and cuts the refits to 5 steps each (a 370M refit step at seq 2048 is about
2 s). A bigger ``--batches``/``--seq-len`` is the user's choice, and lasts longer.

Usage::

    dwm-stream bench gpu [--model 124m|370m] [--seq-len N] [--batches N] [--out DIR]
    dwm-stream bench gpu --dry-run --out /tmp/gpu-dry       # CPU, < 2 minutes
    python -m benchmarks.gpu --part jvp_memory              # only the JVP memory part, merged into the JSON
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM

from algorithms.dwm import Weighter, WeighterConfig
from algorithms.dwm import hypergradient as hypergradient_module
from algorithms.dwm.functional import loss_contributions, per_sample_loss_sums, refit_objective, weighted_loss
from algorithms.dwm.hypergradient import (adam_preconditioner, directional_derivative_jvp, hypergradient,
                                          jvp_attention, jvp_query_block)
from benchmarks.common import (RESULTS_DIR, library_versions, machine_info, min_median_max, output_options,
                               section_io, utc_now,
                               write_json)
from benchmarks.dwm_overhead import MODELS as OVERHEAD_MODELS, _flops, _peak_of, _status_kb

REPO = Path(__file__).resolve().parents[1]
YAML_UNIFORM = REPO / 'yamls' / 'slimpajama-370m-random.yaml'
YAML_DWM = REPO / 'yamls' / 'slimpajama-370m-random-dwm.yaml'

__all__ = ['main', 'build_parser', 'resolve_run', 'run_benchmark', 'render_section', 'replace_section',
           'read_section', 'jvp_memory_model', 'MODELS', 'BEGIN_MARK', 'END_MARK']

SECTION = '## GPU'
BEGIN_MARK = '<!-- gpu:begin -->'
END_MARK = '<!-- gpu:end -->'
SCHEMA_VERSION = 1
# Llama shapes (``dwm_overhead.MODELS``: hidden, layers, heads, FFN width, vocabulary 50304 (gpt-neox-20b's, padded:
# the local tokenizer's ids all fall inside it), seq), tied embeddings as in the 370M YAML; and the dry run's.
MODELS = {**OVERHEAD_MODELS, 'dry': {'hidden': 64, 'layers': 2, 'heads': 4, 'ffn': 128, 'vocab': 1024, 'seq_len': 64}}
# Dense bf16 peak FLOP/s by GPU name (vendor data sheets, SXM parts).
PEAK_BF16 = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12, 'A10G': 125e12, 'L4': 121e12}
TARGETS = {'dwm_over_uniform': 1.10, 'refit_over_plain': 3.0, 'refit_memory': 1.3, 'mfu': 0.35,
           'loader_2_workers': 1.0}


# ---------------------------------------------------------------------------------------------------- sizes
def _budget(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """Everything that sets the run's size, from the options (see the module docstring)."""
    if args.dry_run:
        shape = dict(MODELS['dry'])
        return {'model': 'dry', 'shape': shape, 'seq_len': args.seq_len or shape['seq_len'],
                'batches': args.batches or 12, 'global_batch': 8, 'microbatch': 4, 'stages': 3, 'refit_steps': 1,
                'weighter': {'d_model': 32, 'n_layers': 1, 'n_heads': 4}, 'compile': False,
                'corpus_size': '1MB', 'tokenizer_vocab': 1024, 'reps': 2, 'loader_workers': [1, 2],
                'loader_samples': 256, 'loader_reps': 1, 'train_workers': 0,
                'jvp': [{'hidden': 64, 'layers': 1, 'heads': 4, 'ffn': 128, 'vocab': 1024, 'seq_len': 2048,
                         'batch': 2}]}
    shape = dict(MODELS[args.model])
    return {'model': args.model, 'shape': shape, 'seq_len': args.seq_len or shape['seq_len'],
            'batches': args.batches or 60, 'global_batch': 32, 'microbatch': 16, 'stages': 3,
            'refit_steps': 20 if args.model == '124m' else 5, 'weighter': None, 'compile': True,
            'corpus_size': '4MB', 'tokenizer_vocab': 8192, 'reps': 5, 'loader_workers': [1, 2, 4, 8],
            'loader_samples': 2048, 'loader_reps': 3, 'train_workers': 4,
            'jvp': [{**shape, 'seq_len': args.seq_len or shape['seq_len'], 'batch': 16 if cuda else 2}]}


def _llama_config(shape: dict[str, int], seq_len: int, attn: str = 'sdpa') -> LlamaConfig:
    return LlamaConfig(vocab_size=shape['vocab'], hidden_size=shape['hidden'], intermediate_size=shape['ffn'],
                       num_hidden_layers=shape['layers'], num_attention_heads=shape['heads'],
                       num_key_value_heads=shape['heads'], max_position_embeddings=seq_len,
                       tie_word_embeddings=True, attn_implementation=attn)


def _mib(nbytes: float) -> float:
    return nbytes / 2**20


# ---------------------------------------------------------------------------------------------------- memory probe
class _Memory:
    """Peak memory of an operation: ``torch.cuda.max_memory_allocated`` on CUDA; peak RSS (``VmHWM``, reset through
    ``/proc/self/clear_refs``) on CPU. ``peak_mib`` is absolute (parameters and optimizer state included);
    ``transient_mib`` is the peak minus what was allocated (CUDA) or resident (CPU) at the start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = None
        if device.type == 'cpu':
            try:
                self.libc = ctypes.CDLL('libc.so.6')
            except OSError:  # pragma: no cover - not glibc
                self.libc = None

    def measure(self, fn: Callable[[], Any]) -> dict[str, float]:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            gc.collect()
            torch.cuda.empty_cache()
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return {'peak_mib': _mib(peak), 'transient_mib': _mib(peak - start), 'start_mib': _mib(start),
                    'probe': 'torch.cuda.max_memory_allocated'}
        gc.collect()
        if self.libc is not None:
            out = _peak_of(fn, self.libc)
        else:  # pragma: no cover
            start = _status_kb('VmRSS')
            fn()
            out = {'peak_mib': _status_kb('VmHWM') / 1024, 'start_mib': start / 1024}
            out['transient_mib'] = out['peak_mib'] - out['start_mib']
        return {**out, 'probe': 'peak RSS (VmHWM)'}


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- 1. data
def _prepare(budget: dict[str, Any], data_dir: str, log: Callable[[str], None]) -> dict[str, Any]:
    from dwm_stream.convert.pipeline import convert
    from dwm_stream.demo.data import DataBudget, prepare_data
    workers = os.cpu_count() or 1
    data = DataBudget(corpus_size=budget['corpus_size'], vocab_size=budget['tokenizer_vocab'],
                      seq_len=budget['seq_len'])
    started = time.perf_counter()
    paths = prepare_data(data_dir, data, workers=min(workers, 16), say=lambda step, msg: log(f'  {msg}'))
    prepare_s = time.perf_counter() - started
    out = tempfile.mkdtemp(prefix='dwm-gpu-convert-')
    try:  # the convert rate at every core, into a scratch directory (the cached shards are not touched)
        report = convert(os.path.join(paths['corpus'], 'train'), os.path.join(out, 'mds'),
                         tokenizer=paths['tokenizer'], seq_len=budget['seq_len'], workers=workers, overwrite=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {'paths': paths, 'prepare_s': prepare_s,
            'convert': {'workers': workers, 'tokens': report.num_tokens, 'seconds': report.seconds,
                        'tokens_per_s': report.num_tokens / max(report.seconds, 1e-9)}}


# ---------------------------------------------------------------------------------------------------- 2. training
class _StepClock(Callback):
    """Wall time from one ``BATCH_END`` to the next (loading, DWM's weighting, the step; synchronised on CUDA), each
    interval marked when DWM refitted in it, and DWM's metrics of every refit."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: list[dict[str, Any]] = []
        self.refits: list[dict[str, float]] = []
        self._last: Optional[float] = None
        self._refits_seen = 0

    def _dwm(self, state: State):
        return next((a for a in state.algorithms if hasattr(a, 'refits_done')), None)

    def batch_end(self, state: State, logger: Logger) -> None:
        _sync(self.device)
        now = time.perf_counter()
        dwm = self._dwm(state)
        done = dwm.refits_done if dwm is not None else 0
        refitted = done > self._refits_seen
        if refitted:
            self.refits.append({k: float(v) for k, v in dwm.last_refit_metrics.items()
                                if k in ('dwm/refit/wall_time', 'dwm/refit/step_time', 'dwm/refit/steps',
                                         'dwm/refit/lookahead_gain', 'dwm/refit/ess_min')})
        if self._last is not None:
            self.steps.append({'seconds': now - self._last, 'refit': refitted})
        self._last, self._refits_seen = now, done


def _overrides(budget: dict[str, Any], paths: dict[str, Any], run_dir: str, device: str, dwm: bool) -> list[str]:
    shape, seq = budget['shape'], budget['seq_len']
    mc = 'model.config_overrides'
    out = [
        f'run_name=bench-gpu-{"dwm" if dwm else "uniform"}', f'save_folder={run_dir}', 'autoresume=false',
        'save_interval=1000000ba', 'eval_loader=null', 'eval_interval=1000000ba', f'max_seq_len={seq}',
        f'{mc}.hidden_size={shape["hidden"]}', f'{mc}.intermediate_size={shape["ffn"]}',
        f'{mc}.num_hidden_layers={shape["layers"]}', f'{mc}.num_attention_heads={shape["heads"]}',
        f'{mc}.num_key_value_heads={shape["heads"]}', f'{mc}.max_position_embeddings={seq}',
        f'{mc}.vocab_size={shape["vocab"]}',
        f'tokenizer.name={paths["tokenizer"]}',
        'train_loader.dataset.remote=null', f'train_loader.dataset.local={paths["train"]}',
        f'train_loader.num_workers={budget["train_workers"]}',
        f'train_loader.persistent_workers={"true" if budget["train_workers"] else "false"}',
        f'train_loader.prefetch_factor={2 if budget["train_workers"] else "null"}',
        f'train_loader.pin_memory={"true" if device == "gpu" else "false"}',
        f'global_train_batch_size={budget["global_batch"]}',
        f'device_train_microbatch_size={budget["microbatch"]}',
        f'max_duration={budget["batches"]}ba', f'scheduler.t_warmup={max(1, budget["batches"] // 10)}ba',
        f'device={device}', f'precision={"amp_bf16" if device == "gpu" else "fp32"}',
        'progress_bar=false', 'log_to_console=false', 'callbacks=null', 'loggers=null',
    ]
    if not budget['compile']:
        out.append('compile_config=null')
    if dwm:
        d = 'algorithms.dwm'
        out += [f'{d}.num_stages={budget["stages"]}', f'{d}.refit_steps={budget["refit_steps"]}',
                f'{d}.lookahead_lr=3.0e-4',  # the warm-up's learning rate is ~0 at the first refits
                f'{d}.save_dir={os.path.join(run_dir, "dwm_schedule")}',
                f'{d}.weighter.max_seq_len={seq}',
                f'{d}.refit_loader.batch_size={budget["microbatch"]}',
                f'{d}.refit_loader.dataset.remote=null', f'{d}.refit_loader.dataset.local={paths["train"]}',
                f'{d}.validation.lambada={paths["lambada_fit"]}', f'{d}.validation.max_length={seq}',
                f'{d}.validation.batch_size={budget["microbatch"]}']
        for key, value in (budget['weighter'] or {}).items():
            out.append(f'{d}.weighter.{key}={value}')
    return out


def _train(budget: dict[str, Any], paths: dict[str, Any], work: str, device: torch.device, dwm: bool,
           log: Callable[[str], None]) -> dict[str, Any]:
    from dwm_stream.train.entry import build_trainer, fit, load_config
    yaml = YAML_DWM if dwm else YAML_UNIFORM
    run_dir = os.path.join(work, f'run-{"dwm" if dwm else "uniform"}')
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = _overrides(budget, paths, run_dir, 'gpu' if device.type == 'cuda' else 'cpu', dwm)
    with _env(DWM_LAMBADA_VAL=paths['lambada_fit']):
        cfg = load_config(str(yaml), overrides)
    memory = _Memory(device)
    clock = _StepClock(device)
    holder: dict[str, Any] = {}

    def run() -> None:
        trainer = build_trainer(cfg, config_path=str(yaml))
        trainer.state.callbacks.append(clock)
        holder['algorithm'] = next((a for a in trainer.state.algorithms if hasattr(a, 'refits_done')), None)
        holder['params'] = sum(p.numel() for p in trainer.state.model.parameters())
        holder['compiled'] = cfg.get('compile_config') is not None
        holder['attn'] = getattr(trainer.state.model.model.config, '_attn_implementation', None)
        started = time.perf_counter()
        fit(trainer, cfg)
        holder['fit_s'] = time.perf_counter() - started
        trainer.close()

    mem = memory.measure(run)
    steps = clock.steps
    warm = max(1, len(steps) // 4)  # torch.compile and the first allocations fall in the first quarter
    steady = [s['seconds'] for s in steps[warm:] if not s['refit']]
    if not steady:
        raise RuntimeError(f'{yaml.name}: no steady step to time ({len(steps)} steps); raise --batches')
    dwm_alg = holder['algorithm']
    tokens = budget['global_batch'] * budget['seq_len']
    step = min_median_max(steady)
    result = {
        'yaml': yaml.name, 'overrides': overrides, 'params': holder['params'], 'compiled': holder['compiled'],
        'attn_implementation': holder['attn'], 'fit_s': holder['fit_s'], 'steps_timed': len(steady),
        'warmup_steps': warm, 'step_s': step, 'tokens_per_step': tokens,
        'tokens_per_s': tokens / step['median'], 'all_steps_s': [s['seconds'] for s in steps],
        'refit_steps_marked': [i for i, s in enumerate(steps) if s['refit']], 'memory': mem,
        'refits': clock.refits, 'refits_done': int(dwm_alg.refits_done) if dwm_alg is not None else 0,
    }
    if dwm_alg is not None:
        result['weighter_params'] = dwm_alg.weighter.num_parameters()
        result['weighter'] = dwm_alg.weighter_config.to_dict()
    log(f'  {yaml.name}: {result["fit_s"]:.0f}s, steady step {step["median"]:.3f}s, {result["tokens_per_s"]:,.0f} '
        f'tok/s, peak {mem["peak_mib"]:,.0f} MiB, {result["refits_done"]} refit(s)')
    return result


@contextlib.contextmanager
def _env(**values: str):
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------------- 3. plain PyTorch
class _PlainSetup:
    """A Llama, its AdamW, a weighter and its Adam on one device, with random token batches; the three operations
    (plain step, DWM-weighted step, refit step) written with the project's functional core."""

    def __init__(self, shape: dict[str, int], seq_len: int, batch: int, device: torch.device,
                 weighter: Optional[dict[str, Any]], bf16: bool):
        torch.manual_seed(0)
        self.device, self.bf16 = device, bf16
        self.model = LlamaForCausalLM(_llama_config(shape, seq_len)).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4)
        wcfg = WeighterConfig(vocab_size=shape['vocab'], max_seq_len=seq_len, **(weighter or {}))
        self.weighter = Weighter(wcfg).to(device)
        self.weighter_optimizer = torch.optim.Adam(self.weighter.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, shape['vocab'], (batch, seq_len), generator=gen).to(device)
        self.val_ids = torch.randint(0, shape['vocab'], (batch, seq_len), generator=gen).to(device)
        self.params_total = sum(p.numel() for p in self.model.parameters())
        self.weighter_params = self.weighter.num_parameters()
        self.weighter_config = wcfg

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def plain_step(self) -> None:
        with self._autocast():
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def weighter_forward(self) -> torch.Tensor:
        with torch.no_grad():
            return self.weighter(self.ids)

    def weighted_step(self) -> None:
        weights = self.weighter_forward()
        with self._autocast():
            logits = self.model(input_ids=self.ids).logits
            loss = weighted_loss(logits, self.ids, weights).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def refit_step(self) -> None:
        """One weighter update: the exact one-step hypergradient (Adam look-ahead, JVP) and the refit objective."""
        lm = self.model
        live = dict(lm.named_parameters())
        params = {k: p.detach() for k, p in live.items()}
        ids, val_ids = self.ids, self.val_ids
        tokens = float((ids.shape[1] - 1) * ids.shape[0])

        def contributions_fn(p):
            logits = functional_call(lm, p, args=(), kwargs={'input_ids': ids, 'use_cache': False}).logits
            return loss_contributions(*per_sample_loss_sums(logits, ids), 'token', total_tokens=tokens)

        def val_loss_fn(p):
            logits = functional_call(lm, p, args=(), kwargs={'input_ids': val_ids, 'use_cache': False}).logits
            return per_sample_loss_sums(logits, val_ids)[0].sum() / tokens

        with torch.enable_grad():
            weights = self.weighter(ids)
        result = hypergradient(contributions_fn, val_loss_fn, params, weights.detach(), 3e-4,
                               adam_preconditioner(self.optimizer, live), jvp_context=lambda: jvp_attention(lm))
        self.weighter_optimizer.zero_grad(set_to_none=True)
        loss, _ = refit_objective(result.hypergradient, weights, weights, 3.0)
        loss.backward()
        self.weighter_optimizer.step()


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


@contextlib.contextmanager
def _tf32(enabled: bool):
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _plain_pytorch(budget: dict[str, Any], device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    cuda = device.type == 'cuda'
    setup = _PlainSetup(budget['shape'], budget['seq_len'], budget['microbatch'], device, budget['weighter'],
                        bf16=cuda)
    variants = ['tf32', 'fp32'] if cuda else ['fp32']  # refit precision: TF32 matmuls as Composer sets them on CUDA
    arms: dict[str, list[float]] = {'plain': [], 'weighted': [], 'weighter_forward': [],
                                    **{f'refit_{v}': [] for v in variants}}
    with _tf32(cuda):
        for _ in range(2):  # warm-up: allocations, optimizer state (the Adam preconditioner needs it), kernels
            setup.plain_step()
            setup.weighted_step()
            setup.refit_step()
        for _ in range(budget['reps']):  # alternated; one ratio per repetition
            arms['plain'].append(_timed(setup.plain_step, device))
            arms['weighted'].append(_timed(setup.weighted_step, device))
            arms['weighter_forward'].append(_timed(setup.weighter_forward, device))
            for v in variants:
                with _tf32(v == 'tf32'):
                    arms[f'refit_{v}'].append(_timed(setup.refit_step, device))
        memory = _Memory(device)
        mem = {'plain': memory.measure(setup.plain_step), 'weighted': memory.measure(setup.weighted_step),
               'refit': memory.measure(setup.refit_step)}
    ratios = {'weighted_over_plain': min_median_max([w / p for w, p in zip(arms['weighted'], arms['plain'])])}
    for v in variants:
        ratios[f'refit_{v}_over_plain'] = min_median_max([r / p for r, p in zip(arms[f'refit_{v}'], arms['plain'])])
    ratios['refit_memory_over_plain'] = mem['refit']['peak_mib'] / mem['plain']['peak_mib']
    ratios['weighted_memory_over_plain'] = mem['weighted']['peak_mib'] / mem['plain']['peak_mib']
    out = {'batch': budget['microbatch'], 'seq_len': budget['seq_len'], 'llm_params': setup.params_total,
           'weighter_params': setup.weighter_params, 'weighter': setup.weighter_config.to_dict(),
           'precision': 'bf16 autocast' if cuda else 'fp32', 'refit_variants': variants,
           'seconds': {k: min_median_max(v) for k, v in arms.items()}, 'all_seconds': arms, 'memory': mem,
           'ratios': ratios}
    log(f'  plain PyTorch: weighted/plain {ratios["weighted_over_plain"]["median"]:.3f}, refit/plain '
        f'{ratios[f"refit_{variants[0]}_over_plain"]["median"]:.2f}, refit memory/plain '
        f'{ratios["refit_memory_over_plain"]:.2f}')
    del setup
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------------- 4. JVP memory
def jvp_memory_model(shape: dict[str, int], batch: int, seq_len: int, query_block: Optional[int] = None,
                     bytes_per_value: int = 4) -> dict[str, Any]:
    """Analytic transient memory (bytes) of the refit's JVP (``torch.func.jvp`` under ``no_grad``: nothing is kept
    between layers, so the peak is the largest single op's primal + tangent tensors).

    * attention on the math backend: the scores, then their softmax, each with its tangent (4 tensors of
      ``B x H x rows x T``; ``rows`` = ``T`` unchunked, else ``query_block``, by default ``jvp_attention``'s
      ``jvp_query_block(V, H)``);
    * the LM head: the logits and their log-softmax in the cross-entropy, each with its tangent (4 x ``B x T x V``);
    * parameter-sized: the direction ``u`` and the preconditioner ``P`` (2 x params) beside ``theta``.
    """
    h, layers, heads, vocab = shape['hidden'], shape['layers'], shape['heads'], shape['vocab']
    query_block = query_block or jvp_query_block(vocab, heads)
    rows = min(query_block, seq_len)
    attention = 4.0 * batch * heads * rows * seq_len * bytes_per_value
    attention_unchunked = 4.0 * batch * heads * seq_len * seq_len * bytes_per_value
    head = 4.0 * batch * seq_len * vocab * bytes_per_value
    params = layers * (4 * h * h + 3 * h * shape['ffn']) + h * vocab
    return {'query_block': query_block, 'blocks': -(-seq_len // query_block),
            'attention': attention, 'attention_unchunked': attention_unchunked, 'head': head,
            'parameter_sized': 2.0 * params * bytes_per_value,
            'bound': 'LM head (logits)' if head >= attention else 'attention scores',
            'bound_unchunked': 'LM head (logits)' if head >= attention_unchunked else 'attention scores'}


def _jvp_memory(spec: dict[str, int], device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """The JVP's peak memory, chunked (``jvp_attention``'s default) and unchunked (one block of ``T`` rows)."""
    shape = {k: spec[k] for k in ('hidden', 'layers', 'heads', 'ffn', 'vocab')}
    seq, batch = spec['seq_len'], spec['batch']
    torch.manual_seed(0)
    lm = LlamaForCausalLM(_llama_config(shape, seq)).to(device)
    params = {k: p.detach() for k, p in lm.named_parameters()}
    direction = {k: torch.randn_like(p) for k, p in params.items()}
    ids = torch.randint(0, shape['vocab'], (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def contributions_fn(p):
        logits = functional_call(lm, p, args=(), kwargs={'input_ids': ids, 'use_cache': False}).logits
        return loss_contributions(*per_sample_loss_sums(logits, ids))

    def run(block: int) -> Callable[[], Any]:
        def go() -> None:
            previous = hypergradient_module.JVP_QUERY_BLOCK
            hypergradient_module.JVP_QUERY_BLOCK = block
            try:
                with jvp_attention(lm):
                    directional_derivative_jvp(contributions_fn, params, direction)
            finally:
                hypergradient_module.JVP_QUERY_BLOCK = previous
        return go

    memory = _Memory(device)
    block = hypergradient_module.JVP_QUERY_BLOCK or jvp_query_block(shape['vocab'], shape['heads'])
    with _tf32(device.type == 'cuda'):
        run(block)()  # warm-up
        chunked = memory.measure(run(block))
        unchunked = memory.measure(run(seq))
        timing = {'chunked': _timed(run(block), device), 'unchunked': _timed(run(seq), device)}
    model = jvp_memory_model(shape, batch, seq, block)
    out = {'shape': shape, 'seq_len': seq, 'batch': batch, 'query_block': block, 'device': device.type,
           'chunked': chunked, 'unchunked': unchunked, 'seconds': timing,
           'model_mib': {k: _mib(v) if isinstance(v, float) else v for k, v in model.items()},
           'yaml_370m_model_mib': {k: _mib(v) if isinstance(v, float) else v for k, v in
                                   jvp_memory_model(MODELS['370m'], 16, 2048).items()}}
    log(f'  JVP memory at seq {seq}, batch {batch}: chunked {chunked["transient_mib"]:,.0f} MiB, unchunked '
        f'{unchunked["transient_mib"]:,.0f} MiB (model: scores {out["model_mib"]["attention"]:,.0f} / '
        f'{out["model_mib"]["attention_unchunked"]:,.0f} MiB, head {out["model_mib"]["head"]:,.0f} MiB)')
    del lm, params, direction
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------------- 5. loader
def _loader(budget: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks import loader_throughput as lt
    from dwm_stream.data.dataset import DWMDataset
    seq, samples, reps = 2048, budget['loader_samples'], budget['loader_reps']
    previous = lt.MIN_SECONDS
    lt.MIN_SECONDS = 0.0 if budget['model'] == 'dry' else 0.5
    work = tempfile.mkdtemp(prefix='dwm-gpu-loader-')
    warnings.filterwarnings('ignore', module='streaming')
    warnings.filterwarnings('ignore', message='This DataLoader will create')
    # The tokenizer ran in this process (data, training): forked workers would each print tokenizers' fork warning.
    stack = contextlib.ExitStack()
    stack.enter_context(_env(TOKENIZERS_PARALLELISM='false'))
    try:
        mds = lt.build_mds(os.path.join(work, 'mds'), samples, seq, seed=0)

        def dwm() -> Any:
            return DWMDataset(local=mds, shuffle=True, shuffle_seed=0, batch_size=lt.BATCH_SIZE)

        def plain() -> Any:
            return lt.PlainStreamingDataset(local=mds, shuffle=True, shuffle_seed=0, batch_size=lt.BATCH_SIZE)

        lt.Config('warm', dwm, None, seq).run()

        def say(msg: str) -> None:
            log(msg)

        groups = {
            'workers': lt.run_group('workers', 'DWMDataset through the DataLoader against the do-nothing DataLoader',
                                    [c for w in budget['loader_workers'] for c in (
                                        lt.Config(f'dwm@{w}w', dwm, w, seq),
                                        lt.Config(f'nothing@{w}w', lambda: lt.NothingDataset(samples, seq), w, seq))],
                                    reps, say),
            'direct': lt.run_group('direct', 'direct iteration in one process',
                                   [lt.Config('dwm', dwm, None, seq), lt.Config('streaming', plain, None, seq)],
                                   reps, say),
        }
    finally:
        stack.close()
        lt.MIN_SECONDS = previous
        shutil.rmtree(work, ignore_errors=True)
    ratios = [lt.ratio(groups, f'{w} worker(s): DWMDataset / do-nothing DataLoader', 'workers', f'dwm@{w}w',
                       f'nothing@{w}w') for w in budget['loader_workers']]
    ratios.append(lt.ratio(groups, 'direct: DWMDataset / StreamingDataset', 'direct', 'dwm', 'streaming'))
    return {'seq_len': seq, 'samples': samples, 'reps': reps, 'workers': budget['loader_workers'],
            'batch_size': lt.BATCH_SIZE, 'groups': groups, 'ratios': ratios}


# ---------------------------------------------------------------------------------------------------- driver
def _gpu_info(device: torch.device) -> dict[str, Any]:
    if device.type != 'cuda':
        return {'name': None, 'count': 0}
    props = torch.cuda.get_device_properties(device)
    peak = next((v for k, v in PEAK_BF16.items() if k in props.name), None)
    return {'name': props.name, 'count': torch.cuda.device_count(), 'memory_gib': round(props.total_memory / 2**30, 1),
            'capability': f'{props.major}.{props.minor}', 'peak_bf16_flops': peak, 'cuda': torch.version.cuda}


def _mfu(train: dict[str, Any], shape: dict[str, int], seq_len: int, peak: Optional[float]) -> Optional[float]:
    if not peak:
        return None
    flops_per_token = _flops({'hidden': shape['hidden'], 'layers': shape['layers'], 'vocab': shape['vocab'],
                              'ffn': shape['ffn']}, WeighterConfig(vocab_size=8, d_model=16, n_heads=4, n_layers=1),
                             1, seq_len)['llm_train_per_token']
    return flops_per_token * train['tokens_per_s'] / peak


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Run every part (see the module docstring); returns the results dict."""
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device('cuda' if cuda else 'cpu')
    budget = _budget(args, cuda)
    if getattr(args, 'jvp_shape', 'run') == 'reduced-370m':
        reduced = {**MODELS['370m'], 'hidden': 256, 'layers': 2, 'ffn': 704, 'seq_len': 2048, 'batch': 2}
        # the same at 4 heads and a 1024 vocabulary: a shape where the scores, not the head, would bound the JVP
        budget['jvp'] = [reduced, {**reduced, 'heads': 4, 'vocab': 1024}]
    parts = args.part or ['train', 'plain', 'jvp_memory', 'loader']
    started = time.perf_counter()
    res: dict[str, Any] = {
        'benchmark': 'gpu', 'schema_version': SCHEMA_VERSION, 'source': 'measured', 'dry_run': bool(args.dry_run),
        'date': utc_now(), 'machine': {**machine_info(), 'gpu': _gpu_info(device)}, 'device': device.type,
        'versions': library_versions(('torch', 'mosaicml', 'mosaicml-streaming', 'transformers', 'llm-foundry',
                                      'flash-attn')),
        'settings': {k: v for k, v in budget.items()}, 'parts': parts,
    }
    res['versions']['python'] = res['machine']['python']
    work = tempfile.mkdtemp(prefix='dwm-gpu-bench-')
    try:
        if 'train' in parts or 'data' in parts:
            log(f'[1/5] data: the embedded corpus ({budget["corpus_size"]}), tokenizer, MDS shards at seq '
                f'{budget["seq_len"]}')
            data = _prepare(budget, args.data_dir or os.path.join(work, 'data'), log)
            res['data'] = {'prepare_s': data['prepare_s'], 'convert': data['convert']}
            log(f'  convert at {data["convert"]["workers"]} workers: {data["convert"]["tokens_per_s"]:,.0f} tok/s')
        if 'train' in parts:
            log(f'[2/5] training: uniform, then DWM ({budget["batches"]} batches of {budget["global_batch"]} x '
                f'{budget["seq_len"]}, {budget["model"]})')
            runs = {'uniform': _train(budget, data['paths'], work, device, False, log),
                    'dwm': _train(budget, data['paths'], work, device, True, log)}
            peak = res['machine']['gpu'].get('peak_bf16_flops')
            for run in runs.values():
                run['mfu'] = _mfu(run, budget['shape'], budget['seq_len'], peak)
            u, d = runs['uniform'], runs['dwm']
            runs['ratios'] = {
                'dwm_step_over_uniform': d['step_s']['median'] / u['step_s']['median'],
                'dwm_memory_over_uniform': d['memory']['peak_mib'] / u['memory']['peak_mib'],
                'refit_wall_s_total': sum(r.get('dwm/refit/wall_time', 0.0) for r in d['refits']),
            }
            res['train'] = runs
        if 'plain' in parts:
            log('[3/5] plain PyTorch: plain step, weighted step, refit step')
            res['plain'] = _plain_pytorch(budget, device, log)
        if 'jvp_memory' in parts:
            log('[4/5] the refit JVP\'s memory, chunked and unchunked attention')
            res['jvp_memory'] = [_jvp_memory(spec, device, log) for spec in budget['jvp']]
        if 'loader' in parts:
            log(f'[5/5] loader at {budget["loader_workers"]} workers, seq 2048')
            res['loader'] = _loader(budget, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res['targets'] = _targets(res)
    res['wall_s'] = time.perf_counter() - started
    return res


def _targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: Optional[float], bound: float, kind: str, note: str = '') -> None:
        met = None if value is None else (value <= bound if kind == '<=' else value >= bound)
        out.append({'name': name, 'value': value, 'bound': bound, 'kind': kind, 'met': met, 'note': note})

    if 'train' in res:
        t = res['train']
        add(f'DWM steady step / uniform ({res["settings"]["model"]})', t['ratios']['dwm_step_over_uniform'],
            TARGETS['dwm_over_uniform'], '<=')
        add(f'base step MFU ({res["settings"]["model"]}, uniform)', t['uniform']['mfu'], TARGETS['mfu'], '>=',
            '' if t['uniform']['mfu'] is not None else 'no bf16 peak known for this device')
    if 'plain' in res:
        r = res['plain']['ratios']
        first = res['plain']['refit_variants'][0]
        add(f'refit step / plain step ({first})', r[f'refit_{first}_over_plain']['median'],
            TARGETS['refit_over_plain'], '<=')
        add('refit peak memory / plain step\'s', r['refit_memory_over_plain'], TARGETS['refit_memory'], '<=')
    if 'loader' in res:
        two = next((x for x in res['loader']['ratios'] if x['name'].startswith('2 worker')), None)
        if two is not None:
            add('loader, 2 workers: DWMDataset / do-nothing DataLoader', two['median'], TARGETS['loader_2_workers'],
                '>=')
    return out


# ---------------------------------------------------------------------------------------------------- rendering
def _f(x: Optional[float], fmt: str) -> str:
    return 'n/a' if x is None else format(x, fmt)


def _params(n: float) -> str:
    return f'{n / 1e6:.0f}M' if n >= 10e6 else f'{n / 1e6:.2f}M'


def _mmm(s: dict[str, float], fmt: str) -> str:
    return ' / '.join(format(s[k], fmt) for k in ('min', 'median', 'max'))


def _versions(v: dict[str, str]) -> str:
    names = [('python', 'Python'), ('torch', 'torch'), ('mosaicml', 'Composer'),
             ('mosaicml-streaming', 'streaming'), ('transformers', 'transformers'), ('llm-foundry', 'LLM Foundry'),
             ('flash-attn', 'flash-attn')]
    return ', '.join(f'{label} {v[k]}' for k, label in names if k in v)


def _met(t: dict[str, Any]) -> str:
    return 'n/a' if t['met'] is None else ('met' if t['met'] else '**not met**')


def _render_external(res: dict[str, Any]) -> list[str]:
    lines = [f'_{res["label"]}: {res["description"]} Versions: {_versions(res["versions"])}. Regenerate this '
             f'section on a GPU with `dwm-stream bench gpu`._', '', '| measure | figure |', '|---|---|']
    lines += [f'| {row["measure"]} | {row["figure"]} |' for row in res['figures']]
    lines += ['', '### Targets (issue 19; H200, measured side by side in one run)', '', '| target | figure | met |',
              '|---|---|---|']
    lines += [f'| {t["name"]} | {t["figure"]} | {t["met"]} |' for t in res['targets']]
    return lines


def _render_jvp(cases: list[dict[str, Any]]) -> list[str]:
    y = cases[0]['yaml_370m_model_mib']
    first = cases[0]
    lines = [
        '', '### The refit JVP\'s memory', '',
        f'Measured on {first["device"].upper()} ({first["chunked"]["probe"]}; transient = peak minus the start), fp32, '
        'one JVP of the per-sample losses: the attention in blocks of query rows as `jvp_attention` runs it (its rule, '
        '`jvp_query_block`: vocab // heads rows, so that the scores stay under the LM head\'s size) against one '
        'block of all rows, beside the analytic model (4 primal/tangent tensors of the scores, or of the logits):', '',
        '| Llama (layers x width, heads, vocab), batch x seq | rows per block (blocks) | transient MiB, blocks / one '
        'block | time s, blocks / one block | model MiB: scores in blocks / in one block / LM head | bound |',
        '|---|---:|---:|---:|---:|---|',
    ]
    for j in cases:
        s, m = j['shape'], j['model_mib']
        lines.append(
            f'| {s["layers"]} x {s["hidden"]}, {s["heads"]} heads, vocab {s["vocab"]}; {j["batch"]} x {j["seq_len"]} | '
            f'{min(j["query_block"], j["seq_len"])} ({m["blocks"]}) | {j["chunked"]["transient_mib"]:,.0f} / '
            f'{j["unchunked"]["transient_mib"]:,.0f} | {j["seconds"]["chunked"]:.2f} / {j["seconds"]["unchunked"]:.2f} '
            f'| {m["attention"]:,.0f} / {m["attention_unchunked"]:,.0f} / {m["head"]:,.0f} | {m["bound_unchunked"]} '
            f'in one block, {m["bound"]} in blocks |')
    lines += [
        '', f'At the 370M YAML\'s shape (24 x 1024, 16 heads, vocab {MODELS["370m"]["vocab"]}), refit batch 16 x seq '
        f'2048, fp32, the model gives: attention scores {y["attention_unchunked"] / 1024:,.1f} GiB per layer, LM head '
        f'{y["head"] / 1024:,.1f} GiB, direction and preconditioner {y["parameter_sized"] / 1024:,.1f} GiB: the '
        f'bound is the {y["bound_unchunked"]}, so `jvp_attention` runs one block there ({y["query_block"]} rows '
        f'>= 2048); at seq 8192 the scores would be 16x larger ({16 * y["attention_unchunked"] / 1024:,.0f} GiB) and '
        f'it runs them in blocks of {y["query_block"]} rows. The JVP keeps nothing between layers; the refit step\'s '
        'peak is its look-ahead forward/backward, which keeps every layer\'s activations for the refit batch, in fp32 '
        '(the refit runs outside Composer\'s `amp_bf16` autocast).',
    ]
    return lines


def _render_measured(res: dict[str, Any]) -> list[str]:
    st, m = res['settings'], res['machine']
    gpu = m['gpu']
    where = (f'{gpu["count"]} x {gpu["name"]} ({gpu["memory_gib"]} GiB, CUDA {gpu["cuda"]})' if gpu.get('name')
             else 'no GPU (CPU dry run: the figures check that every part runs, they are not GPU figures)')
    lines = [f'- **Machine:** {where}; {m["nproc"]} CPUs ({m["cpu"]}), {m["ram_gb"]:.1f} GB RAM.',
             f'- **Libraries:** {_versions(res["versions"])}.']
    if 'train' in res:
        t = res['train']
        u, d = t['uniform'], t['dwm']
        shape = st['shape']
        lines += [
            f'- **Training runs:** `yamls/{u["yaml"]}` and `yamls/{d["yaml"]}` through `dwm_stream.train.entry`, '
            f'scaled to Llama {shape["layers"]} x {shape["hidden"]} ({_params(u["params"])} params, vocab '
            f'{shape["vocab"]}), seq {st["seq_len"]}, global batch {st["global_batch"]}, microbatch '
            f'{st["microbatch"]}, {st["batches"]} batches, {"amp_bf16" if res["device"] == "cuda" else "fp32"}, '
            f'attention `{u["attn_implementation"]}`, torch.compile {"on" if u["compiled"] else "off"}; DWM '
            f'{st["stages"]} stages, refits of {st["refit_steps"]} step(s), weighter {_params(d["weighter_params"])} '
            f'params. Steady step: median of the steps after the first {u["warmup_steps"]}, refit steps excluded.',
            '', '| run | steady step (s) min / median / max | tokens/s | MFU | peak memory (MiB) | refits |',
            '|---|---:|---:|---:|---:|---:|']
        for name, run in (('uniform', u), ('DWM', d)):
            lines.append(f'| {name} | {_mmm(run["step_s"], ".3f")} | {run["tokens_per_s"]:,.0f} | '
                         f'{"n/a" if run["mfu"] is None else format(100 * run["mfu"], ".1f") + "%"} | '
                         f'{run["memory"]["peak_mib"]:,.0f} | {run["refits_done"]} |')
        refit_times = ', '.join(f'{r.get("dwm/refit/wall_time", float("nan")):.1f}' for r in d['refits'])
        lines += ['', f'DWM steady step / uniform: **{t["ratios"]["dwm_step_over_uniform"]:.3f}**; peak memory '
                      f'DWM / uniform: {t["ratios"]["dwm_memory_over_uniform"]:.3f}; refits (s): {refit_times} '
                      f'({t["ratios"]["refit_wall_s_total"]:.1f} s in all).']
    if 'plain' in res:
        p = res['plain']
        r, sec, mem = p['ratios'], p['seconds'], p['memory']
        lines += ['', '### Plain PyTorch (no Composer)', '',
                  f'Llama {_params(p["llm_params"])} params, batch {p["batch"]} x seq {p["seq_len"]}, '
                  f'{p["precision"]} for the training steps; weighter {_params(p["weighter_params"])} params; '
                  f'{st["reps"]} alternated repetitions; memory: {mem["plain"]["probe"]}.', '',
                  '| operation | time (s) min / median / max | ratio to the plain step (median) | peak memory (MiB) |',
                  '|---|---:|---:|---:|',
                  f'| plain step | {_mmm(sec["plain"], ".4f")} | 1 | {mem["plain"]["peak_mib"]:,.0f} |',
                  f'| DWM-weighted step | {_mmm(sec["weighted"], ".4f")} | {r["weighted_over_plain"]["median"]:.3f} | '
                  f'{mem["weighted"]["peak_mib"]:,.0f} |',
                  f'| weighter forward alone | {_mmm(sec["weighter_forward"], ".4f")} | | |']
        for v in p['refit_variants']:
            lines.append(f'| refit step ({v}) | {_mmm(sec[f"refit_{v}"], ".4f")} | '
                         f'{r[f"refit_{v}_over_plain"]["median"]:.2f} | '
                         f'{mem["refit"]["peak_mib"]:,.0f} |' if v == p['refit_variants'][0] else
                         f'| refit step ({v}) | {_mmm(sec[f"refit_{v}"], ".4f")} | '
                         f'{r[f"refit_{v}_over_plain"]["median"]:.2f} | |')
        lines += ['', f'Refit peak memory / plain step\'s: {r["refit_memory_over_plain"]:.2f}.']
    if 'jvp_memory' in res:
        lines += _render_jvp(res['jvp_memory'])
    if 'loader' in res:
        ld = res['loader']
        lines += ['', '### Loader', '', f'{ld["samples"]:,} samples of {ld["seq_len"]} tokens, batch '
                  f'{ld["batch_size"]}, {ld["reps"]} repetition(s), rotated order.', '',
                  '| comparison | median | min | max |', '|---|---:|---:|---:|']
        lines += [f'| {x["name"]} | {x["median"]:.2f} | {x["min"]:.2f} | {x["max"]:.2f} |' for x in ld['ratios']]
    if 'data' in res:
        c = res['data']['convert']
        lines += ['', f'Convert (`dwm-stream convert` of the embedded corpus) at {c["workers"]} workers: '
                      f'{c["tokens_per_s"]:,.0f} tokens/s.']
    if res['targets']:
        lines += ['', '### Targets (issue 19)', '', '| target | figure | bound | met |', '|---|---:|---:|---|']
        for t in res['targets']:
            value = _f(t['value'], '.3f') + (f' ({t["note"]})' if t['note'] else '')
            lines.append(f'| {t["name"]} | {value} | {t["kind"]} {t["bound"]:g} | {_met(t)} |')
    return lines


def render_section(res: dict[str, Any]) -> str:
    """The GPU section of RESULTS.md (between its markers), made only from ``res``."""
    lines = [BEGIN_MARK, SECTION, '']
    if res.get('source') == 'external':
        lines += _render_external(res)
        if 'jvp_memory' in res:
            lines += _render_jvp(res['jvp_memory'])
            lines += ['', f'_The JVP memory figures: `{res["jvp_memory_command"]}` on {res["jvp_memory_date"]}._']
    else:
        command = res.get('command', 'dwm-stream bench gpu')
        lines += [f'_Generated by `{command}` on {res["date"]} into `benchmarks/results/gpu.json`; do not edit by '
                  f'hand._', '']
        lines += _render_measured(res)
    lines.append(END_MARK)
    return '\n'.join(lines)


replace_section, read_section = section_io('GPU', BEGIN_MARK, END_MARK)


# ---------------------------------------------------------------------------------------------------- entry point
def resolve_run(args: argparse.Namespace, cuda_available: bool) -> list[str]:
    """Decide, in ``args``, whether this is a dry run and where a dry run writes; returns the notes to print.

    ``--quick`` is ``--dry-run`` (every benchmark's CI option). Without a CUDA device the dry run runs instead of
    the real one, with a note. A dry run writes into ``benchmarks/results`` and its ``RESULTS.md`` only when
    ``--out``/``--results-md`` name them: by default it writes to a new temporary directory, so that the committed
    GPU record is only ever replaced by a GPU run.
    """
    notes = []
    args.dry_run = bool(args.dry_run or args.quick)
    if not args.dry_run and not cuda_available:
        notes.append('NOTE: no CUDA device found: running the CPU dry run instead (every part runs, at toy sizes; its '
                     'figures are not GPU figures). Run `dwm-stream bench gpu` on a machine with a GPU for the real '
                     'ones.')
        args.dry_run = True
    if args.out is None and args.results_md is None and args.dry_run:
        args.out = tempfile.mkdtemp(prefix='dwm-gpu-dry-run-')
        args.results_md = os.path.join(args.out, 'RESULTS.md')
        notes.append(f'dry run: results go to {args.out} (the committed benchmarks/results/gpu.json stays as it is)')
    elif args.out is None:
        args.out = RESULTS_DIR
    return notes


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``dwm-stream bench gpu``."""
    parser = argparse.ArgumentParser(prog='dwm-stream bench gpu', description=__doc__.split('\n')[0],
                                     parents=[output_options('the same as --dry-run')])
    parser.add_argument('--dry-run', action='store_true',
                        help='shrink everything to run on CPU in well under 2 minutes (CI)')
    parser.add_argument('--model', choices=['124m', '370m'], default='124m', help='model size (default: 124m)')
    parser.add_argument('--seq-len', type=int, default=None, help='tokens per sample (default: 1024 at 124m, 2048 '
                                                                   'at 370m)')
    parser.add_argument('--batches', type=int, default=None, help='training batches per run (default: 60)')
    parser.add_argument('--data-dir', default=None, help='cache for the corpus, tokenizer and shards (default: a '
                                                         'temporary directory)')
    parser.add_argument('--jvp-shape', choices=['run', 'reduced-370m'], default='run',
                        help="the JVP memory part's model: the run's (default), or the 370M YAML's at a quarter width "
                             '(256 wide, 2 layers, 16 heads, vocab 50304, batch 2 x seq 2048), and the same with 4 '
                             'heads and vocab 1024 (a CPU measurement)')
    parser.add_argument('--part', action='append', choices=['train', 'plain', 'jvp_memory', 'loader'],
                        help='run only this part (repeatable); its results are merged into the existing JSON')
    parser.set_defaults(out=None)  # unset: the committed results for a GPU run, a temporary directory for a dry run
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry point; 0 also when a target is missed (it is reported) and when there is no CUDA device
    (the dry run runs instead, with a note)."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f'[{time.perf_counter() - t0:6.1f}s] {msg}', flush=True)

    for note in resolve_run(args, torch.cuda.is_available()):
        log(note)
    results_md = os.path.abspath(args.results_md or os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                                                 'RESULTS.md'))
    results = run_benchmark(args, log)
    command = ('dwm-stream bench gpu' + (' --dry-run' if args.dry_run else f' --model {args.model}')
               + (f' --seq-len {args.seq_len}' if args.seq_len else '')
               + (f' --batches {args.batches}' if args.batches else '')
               + (f' --jvp-shape {args.jvp_shape}' if args.jvp_shape != 'run' else ''))
    json_path = os.path.join(args.out, 'gpu.json')
    if args.part and os.path.exists(json_path):  # one part: merged into the record it belongs to
        with open(json_path) as f:
            record = json.load(f)
        for part in args.part:
            key = {'train': 'train', 'plain': 'plain', 'jvp_memory': 'jvp_memory', 'loader': 'loader'}[part]
            record[key] = results[key]
            record[f'{key}_command'] = command + f' --part {part}'
            record[f'{key}_date'] = results['date']
        if record.get('source') != 'external':
            record['targets'] = _targets(record)
        results = record
    else:
        results['command'] = command
    write_json(json_path, results, indent=1)
    section = render_section(results)
    replace_section(results_md, section)
    log(f'wrote {json_path} and the GPU section of {results_md}')
    print(section)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
