"""The training loop: forward, loss, backward, clip, step, log, validate, checkpoint, resume.

    result = train(load_config("configs/tiny_pkm.yaml"), resume="latest")

One call runs one process's part of a run; under torchrun or srun every process calls it (see
pkmlm/distributed.py). The global batch (``data.batch_size`` sequences) is split over ranks, then over
``train.grad_accum`` micro-batches; the loss is the mean token NLL over the whole global batch, so any split
gives the same loss and the same update.
"""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pkmlm import checkpoint as ckpt, distributed as D
from pkmlm.cli import UserError, check_output_dir
from pkmlm.config import Config
from pkmlm.data import DataError
from pkmlm.data.shards import open_split
from pkmlm.data.stream import TrainStream
from pkmlm.eval.evaluation import evaluate_split, histogram_metrics, perplexity, usage_histograms
from pkmlm.eval.sampling import ValidationSamples
from pkmlm.eval.textcodec import load_codec
from pkmlm.fileio import write_text_atomic
from pkmlm.memory import compile_model, value_table as VT, values_file as vfile
from pkmlm.memory.sparse import coalesce_rows
from pkmlm.models.init_from import init_from_checkpoint
from pkmlm.models.transformer import TransformerLM
from pkmlm.precision import autocast
from pkmlm.training import parallel as P
from pkmlm.training.finetune import FineTuning
from pkmlm.training.log import RunLogger
from pkmlm.training.optim import Optimizers, inverse_sqrt_warmup, make_optimizers
from pkmlm.training.reinit import DeadSlotReinit


class TrainingError(UserError):
    """The run cannot go on (too many non-finite losses, a non-finite weight, an occupied out_dir)."""


@dataclass
class TrainResult:
    step: int  # optimizer steps done, over all runs of this out_dir
    losses: dict[int, float] = field(default_factory=dict)  # step -> global mean train NLL, this call's steps
    valid_loss: float | None = None  # last validation mean NLL (nats)
    memory: dict[str, dict] = field(default_factory=dict)  # memory name -> metrics.MemoryStats as dict
    preempted: bool = False  # stopped on SIGUSR1 (requeued under Slurm) or SIGTERM after checkpointing
    model: nn.Module | None = None  # the trained model, unwrapped from DDP (under FSDP: sharded, DTensor weights)


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, sharded: frozenset[int] = frozenset()) -> float:
    """Total L2 norm of the grads of ``params`` (dense or row-sparse); scaled down to ``max_norm`` if above
    (``max_norm`` 0: measure only). Returns the norm before clipping.

    sharded: ids of parameters of which each rank holds a slice (pkmlm/memory/value_table.py): their squares are summed
    over ranks, so every rank measures and clips by the norm of the whole model (all ranks must call then). FSDP's
    DTensor grads are slices too, found by their type.
    """
    grads, sharded_grads = [], []
    # The same on every rank: sharding follows the model, not the data.
    split = bool(sharded) or any(P.is_shard(p) for p in params)
    for p in params:
        if p.grad is None:
            continue
        if P.is_shard(p.grad):
            sharded_grads.append(P.local_tensor(p.grad))  # clipped in place through this view of the shard
        elif p.grad.is_sparse:
            p.grad = coalesce_rows(p.grad)  # duplicate rows must be summed before their norm means anything
            (sharded_grads if id(p) in sharded else grads).append(p.grad._values())
        else:
            (sharded_grads if id(p) in sharded else grads).append(p.grad)
    if split:
        # On the parameters' device even when this rank has no such grads: NCCL reduces CUDA tensors only.
        device = params[0].device
        squares = torch.stack([torch.linalg.vector_norm(g.float()).square() for g in sharded_grads]).sum() \
            if sharded_grads else torch.zeros((), device=device)
        own = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.zeros((), device=device)
        norm = (own.square() + D.all_reduce_sum(squares.to(device))).sqrt()
        grads += sharded_grads
    elif not grads:
        return 0.0
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return norm.item()


def train(config: Config, resume: str | os.PathLike | None = None,
          init_from: str | os.PathLike | None = None) -> TrainResult:
    """Run (or continue) training as this process's part of the job; see the module docstring.

    resume: None (fresh run; refuses an out_dir that holds checkpoints), "latest" (the newest checkpoint in
    ``train.out_dir``, or a fresh run when there is none: the same command works after a requeue), or a path.
    init_from: a checkpoint whose matching weights start a fresh run (pkmlm/models/init_from.py); unused when resuming.
    A process group the caller already joined is used and left up (torchrun's store cannot host a second one).
    """
    env = D.detect_env()
    device = D.resolve_device(config.train.device, env)
    config.validate_runtime(world_size=env.world_size, device_type=device.type)
    created = D.init_process_group(env, device, timeout_s=config.train.dist_timeout_s)
    try:
        # A dead or stuck peer: one line naming this rank and the cause, not torch's traceback.
        with D.collective_errors(config.train.dist_timeout_s, "train.dist_timeout_s"):
            return Trainer(config, env, device).run(resume, init_from)
    finally:
        if created:
            D.destroy_process_group()


class Trainer:
    """One process's training state. ``run()`` is the loop; the other methods are its steps."""

    def __init__(self, config: Config, env: D.DistEnv, device: torch.device):
        self.config, self.env, self.device = config, env, device
        t, d = config.train, config.data
        self.out_dir = Path(t.out_dir)
        self.train_data = open_split(Path(d.dir) / "train", verify_checksums=d.verify_checksums)
        self.valid_data = open_split(Path(d.dir) / "valid", expected_vocab_hash=self.train_data.vocab_hash,
                                     verify_checksums=d.verify_checksums, require_tokens="validation")
        self.stream = TrainStream(self.train_data, batch_size=d.batch_size, bptt=d.bptt, rank=env.rank,
                                  world_size=env.world_size, seed=d.seed)
        self.micro_rows = d.batch_size // (env.world_size * t.grad_accum)

        torch.manual_seed(t.seed)  # same initial weights on every rank
        self.model = TransformerLM(config, config.resolve_vocab_size(self.train_data.vocab_size))
        self.values_file = None  # memory.values_file: the table and its Adam state in mapped files
        if config.memory.values_file:
            self.values_file = vfile.attach(self.model, config.memory.values_file, writable=True, seed=t.seed,
                                            cache_gb=config.memory.values_file_cache_gb)
        # train.freeze / train.trainable (pkmlm/training/finetune.py): frozen parameters, LoRA adapters.
        self.finetune = FineTuning(self.model, config)
        self.model = self.model.to(device)
        self.optim: Optimizers = make_optimizers(self.model, lr=t.lr, value_lr=t.value_lr, betas=tuple(t.betas),
                                                 weight_decay=t.weight_decay)
        # Clipping and norms per optimizer: dense parameters, memory value rows.
        self.groups = {"dense": _params(self.optim.dense)}
        if self.optim.values is not None:
            self.groups["values"] = _params(self.optim.values)
        # Value tables outside DDP: replicated ones are synced by P.all_reduce_sparse_grads, sharded ones need no sync
        # (pkmlm/memory/value_table.py); sharded maps their index in the value optimizer to the table.
        tables = {id(t.weight): t for t in VT.sharded_tables(self.model).values()}
        self.sharded = {i: tables[id(p)] for i, p in enumerate(self.groups.get("values", [])) if id(p) in tables}
        self.sharded_ids = frozenset(tables)
        self.sparse_params = [p for p in self.groups.get("values", []) if id(p) not in tables]
        mem = config.memory
        self.reinit = DeadSlotReinit(self.model, self.optim, every=mem.reinit_every, min_count=mem.reinit_min_count,
                                     seed=t.seed) if mem.reinit_every else None
        self.init_from: str | None = None  # the checkpoint this run's weights started from; saved in every checkpoint
        # Loss scaling is for fp16 only; a disabled scaler passes everything through unchanged.
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
        torch.manual_seed(t.seed + env.rank)  # different dropout masks per rank
        self.step = 0
        self.nonfinite = 0
        self.notes: list[str] = []  # what set-up found worth telling, logged once the logger is up
        self.best: dict | None = None  # {"step", "valid_loss"} of this run's best.pt (train.keep_best), or None

    # ---- checkpoints ------------------------------------------------------------------------------------

    def _resume(self, resume) -> Path | None:
        """Load the checkpoint ``resume`` names (see ``train``); returns its path, None for a fresh run."""
        check_output_dir(self.out_dir, "train.out_dir")  # a file there, or in its path: one clear line
        if resume is None:
            if ckpt.latest_checkpoint(self.out_dir) is not None or ckpt.best_path(self.out_dir).exists():
                raise TrainingError(f"{ckpt.checkpoint_dir(self.out_dir)} already holds checkpoints: pass "
                                    "--resume to continue that run, or set train.out_dir to a new directory")
            return None
        path = ckpt.latest_checkpoint(self.out_dir) if resume == "latest" else Path(resume)
        if path is None:
            self._set_aside(-1)  # a fresh start: a best.pt there belongs to no checkpoint of this run
            if self.values_file is not None:
                self.values_file.restore(0)  # undoes the steps of an attempt that crashed before its first checkpoint
            return None
        state = ckpt.load_checkpoint(path)
        # Keys added since the checkpoint was written take their defaults (which keep the old behaviour).
        saved = Config.from_dict(state["config"], source=f"{path} (saved config)").to_dict()
        steering = ckpt.check_resumable(saved, self.config.to_dict(), path)
        ckpt.check_vocab(state["vocab_hash"], self.train_data.vocab_hash, path)
        try:
            if self.values_file is not None:
                self.values_file.check_record(state.get("values_file"), path)
                self.values_file.restore(state["step"])
                vfile.load_model_state(self.model, state["model"], self.values_file)
            else:
                # Checkpoints hold whole tables: each rank takes its columns, whatever world size wrote them.
                self.model.load_state_dict(VT.local_state(self.model, state["model"]))
            values_state = state["optimizers"]["values"]
            for i, table in self.sharded.items():
                if values_state is not None and i in values_state["state"] and table.world > 1:
                    row_state = values_state["state"][i]
                    row_state["moments"] = table.local_columns(row_state["moments"])
            self.optim.load_state_dict(state["optimizers"])
            if self.scaler.is_enabled() and state.get("scaler") is not None:  # none saved: fp16 starts here
                self.scaler.load_state_dict(state["scaler"])
            self.stream.load_state_dict(state["data"])
            if self.reinit is not None and state.get("reinit") is not None:
                self.reinit.load_state_dict(state["reinit"])
            ranks = state["rng"]["ranks"]
            if len(ranks) == self.env.world_size:
                ckpt.set_rng_state(ranks[self.env.rank], self.device)
        except DataError:
            raise
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            first = lines[1].strip() if len(lines) > 1 else lines[0]  # torch's first line says only "Error(s) in"
            raise ckpt.CheckpointError(f"{path} does not fit this run ({first}): it is damaged or from another "
                                       "model; resume from another checkpoint") from None
        self.init_from = state.get("init_from")
        self.step = state["step"]
        self.best = state.get("best")
        self._set_aside(self.step)
        if len(ranks) != self.env.world_size:  # another process count: data order is kept, dropout masks cannot be
            warnings.warn(f"{path} was written by {len(ranks)} processes, this run has {self.env.world_size}: "
                          "random state (dropout) is reseeded, so the run is not bit-identical")
            torch.manual_seed(self.config.train.seed + self.env.rank + self.step)
        self.notes += [f"resuming with a changed {change} (from here on the run differs from the one it "
                       "continues)" for change in steering]
        return path

    def _set_aside(self, step: int) -> None:
        """Resuming at ``step``: move newer checkpoints (and a best.pt not of this run) aside, and say so."""
        if not self.env.is_main:
            return
        folder, moved = ckpt.abandon_newer(self.out_dir, step, self.best["step"] if self.best else None)
        if moved:
            self.notes.append(f"set aside {', '.join(p.name for p in moved)} into {folder}: they continue a run that "
                              f"this resume from step {max(step, 0)} abandons (moved, not deleted)")

    def _save(self, *, step_file: bool = True, best: bool = False) -> None:
        """Checkpoint the run (all ranks call): ``step_XXXXXXX.pt`` when ``step_file``, best.pt when ``best``."""
        # Decided on all ranks together: a rank that raised alone would leave its peers waiting in a collective.
        local = self.model.state_dict()
        if self.values_file is not None:  # the table stays in its file, made durable before the checkpoint names it
            local = vfile.strip_state(local, self.values_file)
            self.values_file.sync()
        bad = next((name for name, p in local.items()
                    if p.is_floating_point() and not torch.isfinite(P.local_tensor(p)).all()), None)
        flag = D.all_reduce_max(torch.tensor([float(bad is not None)], device=self.device))
        if flag.item() > 0:
            where = f"{bad} holds NaN or inf on rank {self.env.rank}" if bad else "a peer's weights hold NaN or inf"
            raise TrainingError(f"refusing to checkpoint at step {self.step}: {where}. The last checkpoint is "
                                "kept: resume from it with a lower train.lr, a longer train.warmup_steps or a "
                                "smaller train.grad_clip")
        # Replicated weights must be bit-identical on every rank: a checkpoint of drifted replicas would be rank 0's
        # model only, so the run stops instead (every rank raises the same error).
        P.check_replicas((n, p) for n, p in self.model.named_parameters()
                         if id(p) not in self.sharded_ids and not P.is_shard(p))
        model_state = local if self.values_file is not None else P.full_state(self.model, VT.gather_state(self.model))
        optim_state = self._gather_optimizer_state()
        rng = D.all_gather_object(ckpt.rng_state(self.device))  # every rank's generators (all ranks call)
        reinit = self.reinit.state_dict() if self.reinit is not None else None  # all ranks call
        error = None
        if self.env.is_main:
            try:
                self._write(model_state, optim_state, rng, reinit, step_file=step_file, best=best)
            except ckpt.CheckpointError as e:  # a full disk: every rank stops, none waits for rank 0 forever
                error = e
        if D.all_reduce_max(torch.tensor([float(error is not None)], device=self.device)).item() > 0:
            raise error or ckpt.CheckpointError(
                f"rank {self.env.rank}: stopping because rank 0 could not write the checkpoint of step {self.step} "
                "(rank 0's error says why)")

    def _write(self, model_state, optim_state, rng, reinit, *, step_file: bool, best: bool) -> None:
        """Rank 0's part of ``_save``: the checkpoint files."""
        state = {"format": ckpt.FORMAT, "config": self.config.to_dict(), "model": model_state,
                 "optimizers": optim_state, "step": self.step, "rng": {"ranks": rng},
                 "data": self.stream.state_dict(), "vocab_hash": self.train_data.vocab_hash,
                 # The lr schedule is a pure function of the step, so it needs no state of its own.
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                 "reinit": reinit, "init_from": self.init_from, "best": self.best,
                 "values_file": self.values_file.record() if self.values_file is not None else None}
        if best:
            path = ckpt.save_best(state, self.out_dir)
            self.log.message(f"step {self.step}: best validation loss so far, saved {path}")
        if step_file:
            path = ckpt.save_checkpoint(state, self.out_dir, keep=self.config.train.keep_checkpoints)
            if self.values_file is not None:
                self.values_file.checkpoint(self.step)  # later changes are journaled against this checkpoint
            self.log.message(f"step {self.step}: saved {path}")

    def _gather_optimizer_state(self) -> dict | None:
        """The optimizers' state, with whole-width Adam moments for sharded tables, on rank 0 (all ranks call)."""
        state = self.optim.state_dict()
        state["dense"] = P.full_optimizer_state(state["dense"])  # FSDP's shards of the Adam moments, whole
        for i, table in self.sharded.items():
            row_state = state["values"]["state"].get(i)
            if row_state is not None:  # the same rows were stepped on every rank, so all ranks agree
                # A new dict: state_dict() shares the optimizer's own per-parameter dicts.
                state["values"]["state"][i] = {**row_state, "moments": table.gather_columns(row_state["moments"])}
        return state if self.env.is_main else None

    # ---- one optimizer step ------------------------------------------------------------------------------

    def _train_step(self, ddp_model: nn.Module, stop_signal: int | None
                    ) -> tuple[float, dict[str, float], signal.Signals | None]:
        """One optimizer step: ``_forward_backward`` the global batch, then ``_update``.

        Returns (global mean NLL, grad norms per group, the stop signal any rank got: SIGTERM wins over SIGUSR1).
        """
        self.finetune.begin_step()
        nll = self._forward_backward(ddp_model)
        P.all_reduce_sparse_grads(self.sparse_params)
        self.finetune.select_rows()  # train.trainable=slots: only the selected value rows keep their gradient
        # One all-reduce carries the loss and the stop flags, so every rank takes the same decisions.
        flags = [float(stop_signal == sig) for sig in (P.REQUEUE_SIGNAL, P.STOP_SIGNAL)]
        shared = D.all_reduce_sum(torch.cat([nll.view(1), torch.tensor(flags, device=self.device,
                                                                      dtype=torch.float64)]))
        loss = shared[0].item() / (self.config.data.batch_size * self.config.data.bptt)
        norms = self._update(loss)
        self.step += 1
        stop = P.STOP_SIGNAL if shared[2].item() > 0 else P.REQUEUE_SIGNAL if shared[1].item() > 0 else None
        return loss, norms, stop

    def _forward_backward(self, ddp_model: nn.Module) -> torch.Tensor:
        """Forward and backward this rank's rows of the global batch, micro-batch by micro-batch.

        Leaves grads such that DDP's average over ranks is the gradient of the global mean NLL; returns this
        rank's summed NLL (float64 scalar).
        """
        t, bptt = self.config.train, self.config.data.bptt
        world = self.env.world_size
        global_tokens = self.config.data.batch_size * bptt
        rows = next(self.stream).to(self.device, non_blocking=True).long()  # (B / world, bptt + 1)
        if world > 1:
            D.entering_collective()  # DDP's gradient all-reduces in the backward below
        nll = torch.zeros((), device=self.device, dtype=torch.float64)
        micro_batches = rows.split(self.micro_rows)
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP averages grads over ranks; scaling by world / global tokens makes that the global mean.
            with P.gradient_sync(ddp_model, last):
                with autocast(self.device, t.precision):
                    logits = ddp_model(micro[:, :-1])
                micro_nll = F.cross_entropy(logits.float().flatten(0, 1), micro[:, 1:].flatten(), reduction="sum")
                self.scaler.scale(micro_nll * (world / global_tokens)).backward()
            nll += micro_nll.detach()
        return nll

    def _update(self, loss: float) -> dict[str, float]:
        """Clip and apply the grads unless the loss or a grad norm is not finite; returns the grad norms."""
        t = self.config.train
        self.optim.unscale_(self.scaler)
        norms = {name: clip_grad_norm_(params, t.grad_clip, self.sharded_ids) for name, params in self.groups.items()}
        # With fp16 an inf grad norm is the GradScaler's business: it skips the step and lowers the scale.
        finite = math.isfinite(loss) and (self.scaler.is_enabled() or all(map(math.isfinite, norms.values())))
        if finite:
            self.nonfinite = 0
            self.optim.set_lr_factor(inverse_sqrt_warmup(self.step + 1, t.warmup_steps))
            self.optim.step(self.scaler)
        else:
            self.nonfinite += 1
            self.log.message(f"step {self.step + 1}: non-finite loss {loss} or grad norm {norms}: update skipped "
                             f"({self.nonfinite} in a row, limit train.max_nonfinite={t.max_nonfinite})")
            if self.nonfinite >= t.max_nonfinite:
                raise TrainingError(
                    f"{self.nonfinite} non-finite losses in a row at step {self.step + 1}: the run diverged. "
                    "Resume from the last checkpoint with a lower train.lr, a longer train.warmup_steps, "
                    "a smaller train.grad_clip, or train.precision=bf16/fp32")
        self.scaler.update()  # also after a skipped step: it ends the unscale_ of this step (no-op when disabled)
        self.optim.zero_grad()
        return norms

    # ---- validation ----------------------------------------------------------------------------------------

    def _validate(self) -> tuple[float, dict[str, dict]]:
        """Validation mean NLL, and memory usage/KL measured on the validation tokens."""
        memories = [m for _, m in self.model.memories()]
        for m in memories:
            m.track_usage(True)
            m.reset_usage()
        loss, accuracy = evaluate_split(self.model, self.valid_data, batch_size=self.micro_rows,
                                        bptt=self.config.data.bptt, max_batches=self.config.train.eval_batches,
                                        precision=self.config.train.precision)
        histograms = usage_histograms(self.model)
        stats = histogram_metrics(histograms)
        self._valid_details = accuracy, histograms  # for _log_validation
        for m in memories:
            m.track_usage(False)
        if self.reinit is not None:
            self.reinit.track()  # validation used the accumulators the re-initialisation window reads
        return loss, stats

    def _log_validation(self, loss: float, stats: dict[str, dict]) -> None:
        accuracy, histograms = self._valid_details
        values = {"valid/loss": loss, "valid/ppl": perplexity(loss), "valid/accuracy": accuracy}
        for name, s in stats.items():
            values[f"memory/{name}/usage"] = s["usage"]
            values[f"memory/{name}/kl"] = s["kl_counts"]
        self.log.scalars(self.step, values)
        # Per slot, heads summed: how often it was read and the softmax weight it got, on the validation tokens.
        self.log.histograms(self.step, {f"memory/{name}/{kind}": h[key].sum(0) for name, h in histograms.items()
                                        for kind, key in (("slot_reads", "counts"), ("slot_weights", "weights"))})
        if self.samples is not None:  # every rank samples (in lockstep: see _validation_samples), rank 0 logs
            self.log.texts(self.step, self.samples.texts(self.model))
        usage = ", ".join(f"{name} usage {s['usage']:.1%} KL {s['kl_counts']:.3f}" for name, s in stats.items())
        self.log.message(f"step {self.step}: valid loss {loss:.4f} ppl {perplexity(loss):.2f}{self._validation_scope()}"
                         + (f"; {usage}" if usage else ""))

    def _validation_scope(self) -> str:
        """'' when validation reads the whole split, else what part it read (train.eval_batches)."""
        n = self.config.train.eval_batches
        tokens = n * self.micro_rows * self.config.data.bptt * self.env.world_size
        if n == 0 or tokens >= self.valid_data.num_tokens:
            return ""
        return (f" (first {n} batches per rank, ~{tokens / self.valid_data.num_tokens:.0%} of the valid split: "
                "train.eval_batches; evaluate.py reads all of it)")

    def _validation_samples(self) -> ValidationSamples | None:
        """The fixed-prompt samples logged at every validation; None when the data has no tokenizer (all ranks call).

        Every rank samples, not rank 0 alone: a model with sharded value tables reads them in collectives, and
        nothing that one rank runs alone may enter a collective (docs/architecture.md). Rank 0 decodes and logs;
        its verdict on the tokenizer is everyone's, so all ranks sample or none does.
        """
        codec = None
        if self.env.is_main:
            try:
                codec = load_codec(self.config.data.dir, vocab_hash=self.valid_data.vocab_hash)
            except DataError as e:
                self.log.message(f"no samples in TensorBoard: {e}")
        missing = D.all_reduce_max(torch.tensor([float(self.env.is_main and codec is None)], device=self.device))
        if missing.item() > 0:
            return None
        return ValidationSamples(codec, self.valid_data, window=self.config.data.bptt, seed=self.config.train.seed,
                                 precision=self.config.train.precision)

    def _log_reinit(self, report: dict[str, dict] | None) -> None:
        if report is None:
            return
        for name, r in report.items():
            self.log.scalars(self.step, {f"reinit/{name}/{k}": v for k, v in r.items()})
        self.log.message(f"step {self.step}: dead-slot re-initialisation: " + "; ".join(
            f"{name} window usage {r['usage']:.1%}, {r['dead_slots']} slots and {r['dead_subkeys']} sub-keys "
            f"re-initialised" + (f", {r['revived']:.1%} of those reset last time were read since"
                                  if math.isfinite(r["revived"]) else "") for name, r in report.items()))

    # ---- the loop -------------------------------------------------------------------------------------------

    def run(self, resume, init_from=None) -> TrainResult:
        t = self.config.train
        # Installed first, so that a signal arriving during set-up still ends in a clean stop.
        preemption = P.PreemptionHandler().install()
        try:
            if self.env.is_main:
                stale = ckpt.remove_stale_temporaries(self.out_dir)
                if stale:
                    self.notes.append(f"removed {len(stale)} temporary file(s) of an interrupted checkpoint write: "
                                      + ", ".join(p.name for p in stale))
            resumed_from = self._resume(resume)
            self.log = RunLogger(self.out_dir, enabled=self.env.is_main, total_steps=t.max_steps,
                                 initial_step=self.step)
            try:
                self.samples = self._validation_samples()
                if resumed_from is not None:
                    self.log.message(f"resumed from {resumed_from} at step {self.step}"
                                     + (f" (--init-from {init_from} ignored: the weights come from the checkpoint)"
                                        if init_from is not None else ""))
                elif init_from is not None:
                    report = init_from_checkpoint(self.model, init_from, vocab_hash=self.train_data.vocab_hash)
                    self.init_from = report.source
                    self.log.message(report.summary())
                for note in self.notes:
                    self.log.message(note)
                if self.config.train.trainable != "all" or self.config.train.freeze:
                    self.log.message(self.finetune.summary())
                # train.trainable=slots: the background slot reads, counted once (all ranks call).
                background = self.finetune.start(self.out_dir, self.micro_rows, self.train_data.vocab_hash)
                if background is not None:
                    self.log.message(background)
                if self.env.is_main:
                    write_text_atomic(self.out_dir / "config.yaml", self.config.to_yaml())
                ddp_model = P.wrap_model(self.model, self.env, self.device, sparse_params=self.sparse_params,
                                         sharded_params=[t.weight for t in self.sharded.values()],
                                         sync_batchnorm=t.sync_batchnorm, parallel=t.parallel,
                                         precision=t.precision, optimizers=[self.optim.dense])
                self.groups["dense"] = _params(self.optim.dense)  # FSDP replaced them with their shards
                if t.compile:  # only the training forward/backward: validation, samples and saving use self.model
                    ddp_model = compile_model(ddp_model)
                return self._loop(ddp_model, preemption)
            finally:
                self.log.close()
        finally:
            preemption.uninstall()

    def _loop(self, ddp_model: nn.Module, preemption: P.PreemptionHandler) -> TrainResult:
        t = self.config.train
        result = TrainResult(step=self.step, model=self.model)
        tokens_per_step = self.config.data.batch_size * self.config.data.bptt
        window_loss, window_finite, window_start, window_time = 0.0, 0, self.step, time.perf_counter()
        self.model.train()
        while self.step < t.max_steps:
            loss, norms, stop = self._train_step(ddp_model, preemption.signal)
            if self.reinit is not None:
                self._log_reinit(self.reinit.after_step(self.step))
            result.losses[self.step] = loss
            if math.isfinite(loss):
                window_loss, window_finite = window_loss + loss, window_finite + 1
            lr = self.optim.dense.param_groups[0]["lr"]
            postfix = {}
            if self.step % t.log_every == 0:
                elapsed = time.perf_counter() - window_time
                steps = self.step - window_start
                mean = window_loss / window_finite if window_finite else math.nan
                values = {"train/loss": mean, "train/ppl": perplexity(mean), "lr/dense": lr,
                          "tokens_per_s": steps * tokens_per_step / elapsed}
                if self.optim.values is not None:
                    values["lr/values"] = self.optim.values.param_groups[0]["lr"]
                values.update({f"grad_norm/{name}": n for name, n in norms.items()})
                self.log.scalars(self.step, values)
                postfix = dict(loss=mean, ppl=perplexity(mean), lr=lr, tok_s=values["tokens_per_s"])
                window_loss, window_finite, window_start, window_time = 0.0, 0, self.step, time.perf_counter()
            self.log.step(**postfix)
            done = self.step == t.max_steps
            improved = False
            if self.step % t.eval_every == 0 or self.step % t.checkpoint_every == 0 or done or stop is not None:
                P.average_batchnorm_stats(self.model)  # validation and checkpoints use every rank's statistics
            if self.step % t.eval_every == 0 or done:
                result.valid_loss, result.memory = self._validate()
                self._log_validation(result.valid_loss, result.memory)
                # The loss is all-reduced, so every rank takes the same decision (and calls _save).
                improved = t.keep_best and math.isfinite(result.valid_loss) and (
                    self.best is None or result.valid_loss < self.best["valid_loss"])
                if improved:
                    self.best = {"step": self.step, "valid_loss": result.valid_loss}
            step_file = self.step % t.checkpoint_every == 0 or done or stop is not None
            if step_file or improved:
                self._save(step_file=step_file, best=improved)
            if stop is not None:
                result.preempted = True
                self.log.message(f"step {self.step}: stopping on {stop.name} (here or on a peer), checkpoint saved")
                if stop == P.REQUEUE_SIGNAL:
                    if self.env.is_main and P.requeue_slurm_job():
                        self.log.message("asked Slurm to requeue this job")
                else:
                    self.log.message(f"not requeued ({stop.name}: the job was cancelled or the machine stops); "
                                     "--resume continues the run")
                break
        if not result.losses:  # nothing left to train (a finished run resumed): still report on it
            result.valid_loss, result.memory = self._validate()
            self._log_validation(result.valid_loss, result.memory)
        result.step = self.step
        return result


def _params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]
