"""Several training runs trained at once as ONE batched network (:func:`train_batched`).

Runs that share a network, an input size, a batch size and an epoch count (the runs of one table,
or one config over several seeds) differ only in their numbers: initial weights, data order, loss
weights (``lam``, ``acm_weight``), learning rate, and the views they read (``inputs``). Each optimisation step stacks the members'
weights and batch-norm statistics on a new leading axis and runs the members' forward as one
computation with :func:`torch.func.vmap` over :func:`torch.func.functional_call` (the recipe of
PyTorch's model-ensembling tutorial): a convolution of N members becomes one grouped convolution.

Everything else stays each member's own, built and saved by the functions a separate
:func:`osteo.train` uses: its network is built from its seed (the same initial weights), it reads
the training slices in its own order (its seed), computes its own loss terms (Eq. 5 with its own
``lam``), has its own Adam state and learning-rate schedule, and writes its own ``checkpoint.pt``
and ``result.json``. The stack is rebuilt from the members' weights at every step, so gradients flow
back to each member's parameters, and the updated batch-norm statistics are copied back.

Only the training steps are batched; the final test evaluation runs per member. A result's
``engine`` says ``"batched xN"`` (N members trained together). A member's
``seconds`` is its share of the batched epochs' time (the epoch's time divided by the members).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from .data import SliceData, SliceSet
from .models import ModelOutput
from .training import (
    TrainConfig, TrainingInterrupted, TrainResult, _check_data_split, _final_result, _rng_state, _Run, _set_rng_state,
    _start_run, _test_every_epoch, _training_set, cached_result, epoch_batches, epoch_record, loss_terms,
    network_inputs, resolve_device, resume_run, save_run,
)

__all__ = ["BATCH_KEYS", "batch_key", "train_batched"]

#: The config fields that members of one batched run must share (the rest may differ).
BATCH_KEYS = ("model", "epochs", "batch_size", "image_size", "device", "amp", "num_classes")


def batch_key(cfg: TrainConfig) -> tuple:
    """Configs with the same key can train together in :func:`train_batched`."""
    return tuple(getattr(cfg, k) for k in BATCH_KEYS)


class _Forward(nn.Module):
    """The network's forward (its registry entry's) as a module, for functional_call."""

    def __init__(self, run: _Run):
        super().__init__()
        self.net, self.spec = run.model, run.spec

    def forward(self, *xs):
        return self.spec.run(self.net, list(xs))


class _BatchedStep:
    """One optimisation step of every member: stacked forward under vmap, each member's loss and Adam."""

    def __init__(self, runs: list[_Run], amp: bool):
        self.runs, self.amp = runs, amp
        self.fwd = _Forward(runs[0])  # its weights are never used: functional_call swaps in the stack
        self.param_names = [k for k, _ in runs[0].model.named_parameters()]
        self.buffer_names = [k for k, _ in runs[0].model.named_buffers()]

    def __call__(self, hus: list, ys: list):
        runs = self.runs
        params = [dict(r.model.named_parameters()) for r in runs]
        buffers = [dict(r.model.named_buffers()) for r in runs]
        p = {f"net.{k}": torch.stack([d[k] for d in params]) for k in self.param_names}
        b = {f"net.{k}": torch.stack([d[k] for d in buffers]) for k in self.buffer_names}
        xs = [torch.stack(v) for v in zip(*(network_inputs(r.cfg, hu) for r, hu in zip(runs, hus)))]

        def one(p, b, *x):  # vmap returns tensors only: the output's dicts, not its head's name
            o = functional_call(self.fwd, (p, b), x)
            return o.logits, o.features, o.aux

        main = runs[0].spec.main_head
        with torch.autocast(hus[0].device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = vmap(one)(p, b, *xs)
            outs = [ModelOutput(*tree_map(lambda t, i=i: t[i], out), main) for i in range(len(runs))]
            terms = [loss_terms(r.cfg, o, y, o.aux.get("acm")) for r, o, y in zip(runs, outs, ys)]
        with torch.no_grad():  # the batch-norm statistics the forward updated in the stack, back to each member
            for i, d in enumerate(buffers):
                for k in self.buffer_names:
                    d[k].copy_(b[f"net.{k}"][i])
        for r in runs:
            r.opt.zero_grad(set_to_none=True)
        torch.stack([t["total"] for t in terms]).sum().backward()  # independent members: each gets its own gradient
        for r in runs:
            r.opt.step()
        return outs, terms


def _batched_epoch(runs: list[_Run], epoch: int, train_set: SliceSet, step: _BatchedStep, bar, counter: list,
                   stop_after_steps=None) -> list[dict]:
    """One epoch of every member (each in its own order, as :func:`osteo.training.train_epoch`); their records."""
    cfg0, device, n = runs[0].cfg, runs[0].device, len(train_set)
    t0 = time.perf_counter()
    orders = [torch.randperm(n, generator=torch.Generator().manual_seed(r.cfg.seed * 100_003 + epoch)).to(device)
              for r in runs]
    rows = [[] for _ in runs]
    correct = [torch.zeros((), device=device) for _ in runs]
    names = [None] * len(runs)  # each member's loss terms (a zero weight leaves its term out)
    for lo, hi in epoch_batches(n, cfg0.batch_size):
        idx = [o[lo:hi] for o in orders]
        hus, ys = [train_set.hu[i] for i in idx], [train_set.y[i] for i in idx]
        outs, terms = step(hus, ys)
        for j, (out, t, y) in enumerate(zip(outs, terms, ys)):
            names[j] = list(t)
            rows[j].append(torch.stack([t[k].detach().float() for k in names[j]]))
            correct[j] += (out.logits[out.main].argmax(1) == y).sum()
            runs[j].steps_done += 1
        bar.update(1)
        counter[0] += 1
        if stop_after_steps is not None and counter[0] >= stop_after_steps:
            bar.close()
            raise TrainingInterrupted(f"stopped after {counter[0]} batched steps (stop_after_steps)")
    share = (time.perf_counter() - t0) / len(runs)
    return [epoch_record(r, epoch, names[j], rows[j], correct[j], n, time.perf_counter() - share) for j, r in enumerate(runs)]


def _check_members(configs: list[TrainConfig], out_dirs) -> None:
    if not configs:
        raise ValueError("train_batched: no configs given")
    keys = {batch_key(c) for c in configs}
    if len(keys) > 1:
        differ = [k for k, *vals in zip(BATCH_KEYS, *keys) if len(set(vals)) > 1]
        raise ValueError(f"train_batched: the configs differ in {', '.join(differ)}; members of one batched run "
                         f"must share {', '.join(BATCH_KEYS)}")
    if out_dirs is not None:
        if len(out_dirs) != len(configs):
            raise ValueError(f"train_batched: {len(configs)} configs but {len(out_dirs)} out_dirs")
        resolved = [Path(d).resolve() for d in out_dirs]
        if len(set(resolved)) < len(resolved):
            raise ValueError("train_batched: two members share one out_dir; each run needs its own folder")
    if len({c.key() for c in configs}) < len(configs):
        raise ValueError("train_batched: the same config twice; a batched run trains different runs")


def train_batched(configs: list[TrainConfig], data: SliceData, out_dirs=None, progress: bool = True,
                  stop_after_steps: int | None = None, checkpoint_every_s: float = 30.0) -> list[TrainResult]:
    """Train several configs on ``data`` as one batched network; the same results as :func:`osteo.train`
    on each (same initial weights, data order, losses, optimiser, checkpoints and ``result.json``).

    The configs must share :data:`BATCH_KEYS` (network, epochs, batch size, image size, device).
    ``out_dirs`` (one folder per config) works as ``out_dir`` of :func:`osteo.train`: a member with a
    saved result is not trained again, and an interrupted batched run resumes each member from its own
    checkpoint. ``stop_after_steps`` counts batched steps (each is one step of every member).
    The fast engines of a single run (grouped, compile) are not used: the members' forward is vmapped.
    """
    configs = list(configs)
    _check_members(configs, out_dirs)
    device = resolve_device(configs[0].device)
    results: list = [None] * len(configs)
    members = []  # (index, run, checkpoint path, result path, its random state)
    for i, cfg in enumerate(configs):
        ckpt_path = result_path = None
        if out_dirs is not None:
            Path(out_dirs[i]).mkdir(parents=True, exist_ok=True)
            ckpt_path, result_path = Path(out_dirs[i]) / "checkpoint.pt", Path(out_dirs[i]) / "result.json"
            cached = cached_result(cfg, out_dirs[i])
            if cached is not None:
                results[i] = cached
                continue
        _check_data_split(cfg, data)
        run = _start_run(cfg, device)
        if ckpt_path is not None and ckpt_path.exists():
            resume_run(run, ckpt_path)
        members.append([i, run, ckpt_path, result_path, _rng_state(device)])
    if not members:
        return results
    train_set = _training_set(data, device)
    cfg0 = members[0][1].cfg
    steps = len(epoch_batches(len(train_set), cfg0.batch_size))
    start = min(m[1].start_epoch for m in members)
    bar = tqdm(total=cfg0.epochs * steps, initial=start * steps, desc=f"train {len(members)} x {cfg0.model}",
               disable=not progress, leave=False)
    amp = cfg0.amp and device.type == "cuda"
    last_save, counter = time.perf_counter(), [0]
    for m in members:
        m[1].model.train()
    for epoch in range(start, cfg0.epochs):
        active = [m for m in members if m[1].start_epoch <= epoch]  # a member resumed from a later checkpoint waits
        runs = [m[1] for m in active]
        recs = _batched_epoch(runs, epoch, train_set, _BatchedStep(runs, amp), bar, counter, stop_after_steps)
        save = epoch + 1 == cfg0.epochs or time.perf_counter() - last_save >= checkpoint_every_s
        for m, rec in zip(active, recs):
            run = m[1]
            if run.cfg.report_epoch == "best_on_test":
                _test_every_epoch(run, rec, data.test)
            run.history.append(rec)
            if save and m[2] is not None:
                _set_rng_state(m[4], device)  # the random state a separate run would save (training draws none)
                save_run(run, m[2], epoch + 1)
        if save:
            last_save = time.perf_counter()
        bar.set_postfix(epoch=epoch + 1)
    bar.close()
    for i, run, _, result_path, _ in members:
        result = _final_result(run, data)
        result.engine = f"batched x{len(members)}"  # how its steps ran: vmapped beside the other members
        if result_path is not None:
            result.to_json(result_path)
        results[i] = result
    return results
