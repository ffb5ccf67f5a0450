"""The training loop, shared by every architecture and every number of processes.

Reads top to bottom: set up (or resume) → for each step: batch, forward (the architecture
returns its loss), backward, decoder-norm constraint, Adam step, dead-latent bookkeeping,
optional resampling, logging, checkpoint → fold the input scale and save.

The loop knows nothing of any architecture: the SAE computes its loss, and its config
(``cfg.sae``) gives the sparsity coefficient's schedule, resampling and the initial norm.
Several processes (``torchrun``) run the same loop with a
:class:`~saelab.parallel.TorchCommunicator`; on one process the communicator does nothing.

A run with an output folder writes ``checkpoint.pt`` every ``checkpoint_every_steps`` and
``metrics.jsonl`` every ``log_every_steps``; re-running with the same folder resumes from
the checkpoint and ends with the same weights as a run that never stopped.
"""

from __future__ import annotations

import json
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor
from tqdm.auto import tqdm

from saelab import stage
from saelab.activations.source import ActivationSource, open_source
from saelab.config import FORMAT_VERSION, build, validation_message
from saelab.device import pick_matmul_dtype, resolve_device
from saelab.errors import InputError, TrainingDiverged
from saelab.io import atomic_torch_save, atomic_write_text
from saelab.parallel import SINGLE, Communicator
from saelab.sae.base import CFG_FILENAME, SAE, WEIGHTS_FILENAME, TrainContext, create, fvu
from saelab.sae.config import migrate_sae_v1, migrate_train_v1
from saelab.train import memory, optim
from saelab.train.config import TrainConfig
from saelab.train.init import geometric_median, input_scale

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
INIT_SAMPLE_ROWS = 65536
MEDIAN_SAMPLE_ROWS = 8192
RESAMPLE_SAMPLE_ROWS = 16384
# Settings that may change between a run and its resumption without changing the result.
# (The names recorded in cfg.json are among them: they describe the data, they do not change it.)
# (matmul_dtype, like device, is how the arithmetic runs: a resumed run keeps the dtype its
# checkpoint records.)
RESUMABLE_CHANGES = {"device", "matmul_dtype", "progress", "checkpoint_every_steps", "log_every_steps",
                     "model_name", "hook_name", "hook_name_out", "allow_incomplete"}


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the defaults that depend on the architecture written out (the optimiser and
    its LR decay), so a checkpoint and cfg.json say what ran."""
    name = cfg.resolved_optimizer()
    decay = cfg.lr_decay_fraction
    if decay is None:
        decay = 0.0 if name == "signum" else 0.2
    return cfg.model_copy(update={"optimizer": name, "lr_decay_fraction": decay})


class Trainer:
    """Trains one SAE on one activation source. ``run()`` returns the trained SAE with the
    input scale folded in (it acts on raw activations). With a ``comm`` over several
    processes every process runs it on its share of each batch (and of the latents); the
    main process writes the files."""

    def __init__(self, source: ActivationSource, cfg: TrainConfig,
                 out_dir: str | Path | None = None, comm: Communicator = SINGLE) -> None:
        self.source = source
        self.comm = comm
        # What the activations say of themselves (a store's model and hooks) goes into cfg.json
        # unless the config names it.
        said = {k: getattr(source, k, None) for k in ("model_name", "hook_name", "hook_name_out")}
        unset = {k: v for k, v in said.items() if v and getattr(cfg, k) is None}
        if unset:
            cfg = cfg.model_copy(update=unset)
        if not comm.is_main and cfg.progress:
            cfg = cfg.model_copy(update={"progress": False})
        cfg = resolve_defaults(cfg)
        self.cfg = cfg
        if cfg.batch_size % comm.dp:
            raise InputError(f"--batch-size {cfg.batch_size} must divide evenly over {comm.dp} "
                             "data-parallel ranks")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = resolve_device(cfg.device)
        self.steps = cfg.steps()
        d_out = getattr(source, "d_out", None)  # a PairedSource: a transcoder's (input, target)
        self.sae_cfg = cfg.sae_config(source.d_in, d_out)
        self.n = self.sae_cfg.n_latents
        self.optimizer_name = str(cfg.optimizer)
        self.lr = cfg.lr if cfg.lr is not None else optim.default_lr(self.optimizer_name, self.n)
        self.warmup = (
            cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None
            else 0 if self.optimizer_name == "signum" else min(1000, self.steps // 20)
        )
        self.decay_steps = int(float(cfg.lr_decay_fraction or 0) * self.steps)
        self.generator = torch.Generator().manual_seed(cfg.seed)

        self._check_trainable(source)
        kind = SAE.registry[self.sae_cfg.architecture]
        if kind.reads_pairs != (d_out is not None):
            pairs = [a for a, c in SAE.registry.items() if c.reads_pairs]
            raise InputError(
                f"a {kind.architecture} coder reads (input, target) pairs: give the target activations "
                "too (--target-acts)" if kind.reads_pairs else
                f"a {kind.architecture} SAE reconstructs its input; target activations are for "
                f"{', '.join(pairs)}")
        self.sae: SAE = create(self.sae_cfg)
        self.sae.init_weights(self.generator)
        if comm.ls > 1:
            self.sae = self._latent_shard(self.sae)
        self.sae.to(self.device)
        self._make_optimizer()
        self.tokens_since_fired = torch.zeros(self.sae.n_latents, dtype=torch.long, device=self.device)
        self.scale = 1.0  # inputs are multiplied by it (E‖x‖² = d_in)
        self.target_scale = 1.0  # a transcoder's targets, likewise
        self.step = 0
        self.elapsed = 0.0
        self.finished = False
        self.last_checkpoint_step: int | None = None
        self.matmul_dtype: str | None = None  # what matmul_dtype runs as (None: dtype itself)
        self.matmul_why = ""  # and why ('auto' is resolved by begin(), or a checkpoint says)
        self.settings = run_settings(cfg)
        self.reused: SAE | None = None  # the finished SAE found in out_dir, if begin() found one
        self._retaining: weakref.finalize | None = None  # releases this run's memory.retain()

    def _check_trainable(self, source: ActivationSource) -> None:
        """Refuse, before anything is allocated, a run that cannot learn or cannot fit."""
        cfg, sae_cfg = self.cfg, self.sae_cfg
        if source.n_rows < cfg.batch_size:
            raise InputError(
                f"{source.describe()}: {source.n_rows:,} rows are fewer than one batch (--batch-size "
                f"{cfg.batch_size:,}); give more rows or a smaller --batch-size")
        k = getattr(sae_cfg.sae, "k", None)
        if k is not None and k > sae_cfg.d_in:
            raise InputError(
                f"k = {k} is more than the {sae_cfg.d_in} columns of the activations: such a code is no "
                "sparser than its input; lower --k")
        n_local = -(-self.n // self.comm.ls)
        param_bytes = torch.empty(0, dtype=getattr(torch, cfg.dtype)).element_size()
        need = memory.training_bytes(sae_cfg.d_in, sae_cfg.d_out or sae_cfg.d_in, n_local,
                                     cfg.batch_size // self.comm.dp, param_bytes)
        have = memory.free_bytes(self.device)
        if have is not None and need > have:
            raise InputError(
                f"this run needs about {memory.gib(need)} on {self.device} ({n_local:,} latents x "
                f"{sae_cfg.d_in} wide, batch {cfg.batch_size // self.comm.dp:,}: parameters, gradients, "
                f"Adam's moments and the dense [batch, latents] buffers; see benchmarks/train_memory.md) "
                f"but {memory.gib(have)} is free; lower --n-latents / --expansion-factor or --batch-size"
                + (", or split the latents over processes (--latent-shards)" if self.comm.ls == 1 else ""))

    def _latent_shard(self, full: SAE) -> SAE:
        """This process's slice of the latents of ``full`` (``--latent-shards``)."""
        if not full.latent_sharding:
            able = [a for a, cls in SAE.registry.items() if cls.latent_sharding]
            raise InputError(f"latent sharding is for {', '.join(able)} SAEs, not {full.architecture}; "
                             "use data parallelism alone (--latent-shards 1)")
        n_local = self.comm.local_latents(self.n)
        try:
            self.sae_cfg.sae.check(self.sae_cfg.d_in, n_local)
        except ValueError as e:
            raise InputError(f"on a latent shard of {n_local} latents: {e}") from None
        local = create(self.sae_cfg.model_copy(update={"n_latents": n_local}))
        local.load_state_dict(self._slice_state(full.state_dict()))
        return local

    # ------------------------------------------------------------------ latent shards
    def _latent_dim(self, name: str) -> int | None:
        return self.sae.latent_dims.get(name, 0)

    def _slice_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: self.comm.slice_latents(t, self._latent_dim(name)) for name, t in state.items()}

    def _gather_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: self.comm.gather_latents(t, self._latent_dim(name)) for name, t in state.items()}

    def _optimizer_shards(self, transform: Any, opt_state: dict[str, Any]) -> dict[str, Any]:
        """Adam's moments gathered or sliced like the parameters they belong to."""
        names = [name for name, _ in self.sae.named_parameters()]
        state = {
            i: {key: transform(v, self._latent_dim(names[i])) if key != "step" else v
                for key, v in st.items()}
            for i, st in opt_state["state"].items()
        }
        return {"state": state, "param_groups": opt_state["param_groups"]}

    def _make_optimizer(self) -> None:
        """The optimiser (``cfg.optimizer``) over the SAE's parameters, each as one contiguous
        tensor. The encoder is kept as contiguous latent rows and seen as their transpose
        ``W_enc`` [d_in, n]; the optimiser gets the rows instead (a leaf sharing their storage),
        which it updates in place, where on the transposed view Adam's fused kernel would copy
        all four tensors each step (about 10x slower). Checkpoints hold the state in the
        parameters' own layout."""
        self._steps_as: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        for p in self.sae.parameters():
            view = p
            if p.dim() == 2 and not p.is_contiguous() and p.t().is_contiguous():
                view = torch.nn.Parameter(p.detach().t())
            self._steps_as.append((p, view))
        self.optimizer = optim.make(self.optimizer_name, [v for _, v in self._steps_as], self.lr)

    def _optimizer_layout(self, opt_state: dict[str, Any], to_params: bool) -> dict[str, Any]:
        """The optimizer's state with each transposed parameter's moments transposed: to the
        parameters' layout (for a checkpoint) or back to the optimizer's (from one)."""
        flipped = {i for i, (p, v) in enumerate(self._steps_as) if v is not p}
        if not flipped:
            return opt_state

        def move(t: Any) -> Any:
            if not isinstance(t, Tensor) or t.dim() != 2:
                return t
            return t.t() if to_params else t.t().contiguous()

        state = {i: ({k: move(t) for k, t in st.items()} if i in flipped else st)
                 for i, st in opt_state["state"].items()}
        return {**opt_state, "state": state}

    # ------------------------------------------------------------------ schedules
    def lr_at(self, step: int) -> float:
        factor = 1.0
        if self.warmup:
            factor = min(factor, (step + 1) / self.warmup)
        if self.decay_steps:
            factor = min(factor, (self.steps - step) / self.decay_steps)
        return self.lr * factor

    def sparsity_coefficient_at(self, step: int) -> float:
        return self.sae_cfg.sae.sparsity_coefficient(step, self.steps)

    # ------------------------------------------------------------------ state
    def _init_from_data(self) -> None:
        sample = self.source.sample(INIT_SAMPLE_ROWS, self.cfg.seed)
        inputs, targets = sample if isinstance(sample, tuple) else (sample, None)
        self.scale = input_scale(inputs) if self.cfg.normalize_inputs else 1.0
        self.target_scale = self.scale
        if targets is not None:  # a transcoder: b_dec lives in the target's space
            self.target_scale = input_scale(targets) if self.cfg.normalize_inputs else 1.0
        with torch.no_grad():
            if targets is None:
                self.sae.b_dec.copy_(self._centre(inputs, self.scale).to(self.sae.b_dec))
            else:  # the output's centre, and the input's (which an SAE's b_dec is for both)
                self.sae.b_dec.copy_(self._centre(targets, self.target_scale).to(self.sae.b_dec))
                self.sae.init_input_centre(self._centre(inputs, self.scale).to(self.device))

    def _centre(self, rows: Tensor, scale: float) -> Tensor:
        """Where ``b_dec_init`` puts the centre of ``rows · scale``."""
        if self.cfg.b_dec_init == "geometric_median":
            return geometric_median(rows[:MEDIAN_SAMPLE_ROWS] * scale)
        if self.cfg.b_dec_init == "mean":
            return (rows * scale).mean(0)
        return torch.zeros(rows.shape[1])

    def state_dict(self) -> dict[str, Any]:
        """The whole run (every latent shard gathered: a collective on several processes)."""
        optimizer = self._optimizer_layout(self.optimizer.state_dict(), to_params=True)
        if self.comm.ls > 1:
            optimizer = self._optimizer_shards(self.comm.gather_latents, optimizer)
        return {
            "format_version": FORMAT_VERSION,
            "kind": "saelab-train-checkpoint",
            "step": self.step,
            "finished": self.finished,
            "elapsed": self.elapsed,
            "train_config": self.cfg.model_dump(),
            "sae_config": self.sae_cfg.model_dump(),
            "input_scale": self.scale,
            "target_scale": self.target_scale,
            "model": self._gather_state(self.sae.state_dict()),
            "optimizer": optimizer,
            "tokens_since_fired": self.comm.gather_latents(self.tokens_since_fired, 0).cpu(),
            "generator": self.generator.get_state(),
            "matmul_dtype": self.matmul_dtype,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        optimizer = state["optimizer"]
        if self.comm.ls > 1:
            optimizer = self._optimizer_shards(self.comm.slice_latents, optimizer)
        self.sae.load_state_dict(self._slice_state(state["model"]))
        self.optimizer.load_state_dict(self._optimizer_layout(optimizer, to_params=False))
        self.tokens_since_fired.copy_(self.comm.slice_latents(state["tokens_since_fired"], 0))
        self.generator.set_state(state["generator"])
        self.scale = float(state["input_scale"])
        self.target_scale = float(state.get("target_scale", self.scale))
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.finished = bool(state["finished"])
        self.last_checkpoint_step = self.step
        if "matmul_dtype" in state:  # what the run began with ('auto' resolved)
            self.matmul_dtype = state["matmul_dtype"]
            self.matmul_why = f"{self.matmul_dtype or self.cfg.dtype} matmuls, as the run began"

    def _checkpoint_path(self) -> Path | None:
        return self.out_dir / CHECKPOINT if self.out_dir is not None else None

    def _reuse(self) -> bool:
        """Take the SAE a finished run with these settings left in out_dir (its completion
        marker says so), without reading the checkpoint."""
        if self.out_dir is None or stage.finished(self.out_dir, self.settings) is None \
                or not (self.out_dir / WEIGHTS_FILENAME).is_file():
            return False
        sae = SAE.load(self.out_dir)
        if (sae.d_in, sae.cfg.d_out) != (self.sae_cfg.d_in, self.sae_cfg.d_out):
            raise InputError(
                f"{self.out_dir} holds an SAE of width {sae.d_in}, these activations have width "
                f"{self.source.d_in}; use another --out")
        self.reused = sae.to(self.device).eval()
        self.finished = True
        return True

    def _try_resume(self) -> bool:
        path = self._checkpoint_path()
        if path is None or not path.exists():
            return False
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:  # a torn file cannot happen (atomic writes), a foreign one can
            raise InputError(f"{path} is not a readable saelab checkpoint ({e}); delete it "
                             "to start over") from None
        if state.get("kind") != "saelab-train-checkpoint":
            raise InputError(f"{path} is not a saelab training checkpoint")
        if state["format_version"] > FORMAT_VERSION:
            raise InputError(f"{path} was written by a newer saelab; upgrade to resume it")
        if state["format_version"] < 2:
            state = {**state, "train_config": migrate_train_v1(state["train_config"]),
                     "sae_config": migrate_sae_v1(state["sae_config"])}
        if "optimizer" not in state["train_config"]:  # saelab 0.5 and earlier: always Adam
            state = {**state, "train_config": {**state["train_config"], "optimizer": "adam"}}
        # A setting added after the checkpoint was written counts as its default there.
        try:
            written = TrainConfig.model_validate(state["train_config"])
        except ValidationError as e:
            raise InputError(f"{path} holds settings this saelab cannot read ({validation_message(e)}); "
                             "delete it to start over") from None
        self.settings.require_same(
            run_settings(written), self.out_dir,
            fix="give the settings it began with (a saelab 0.5 run: --optimizer adam), use another "
                "--out, or delete that folder to start over")
        if "matmul_dtype" not in state:  # saelab 0.5 ran matmul_dtype as it was set
            state = {**state, "matmul_dtype": None if written.matmul_dtype in (None, "auto", "float32")
                     else written.matmul_dtype}
        if state["sae_config"]["d_in"] != self.source.d_in:
            raise InputError(
                f"{self.out_dir} was trained on width {state['sae_config']['d_in']}, "
                f"these activations have width {self.source.d_in}"
            )
        self.load_state_dict(state)
        return True

    def save_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        state = self.state_dict()  # a collective: every process takes part
        if self.comm.is_main:
            atomic_torch_save(state, path)
        self.last_checkpoint_step = self.step
        self.comm.barrier()

    # ------------------------------------------------------------------ dead latents
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    @torch.no_grad()
    def _resample_dead(self) -> int:
        """Towards Monosemanticity's resampling: dead latents restart on inputs the SAE
        reconstructs worst (sampled ∝ squared error)."""
        window = min(self.cfg.dead_after_tokens,
                     (self.sae_cfg.sae.resampling_interval() or 1) * self.cfg.batch_size)
        dead = torch.nonzero(self.tokens_since_fired >= window).flatten()
        if dead.numel() == 0:
            return 0
        x = self.source.sample(RESAMPLE_SAMPLE_ROWS, self.cfg.seed + self.step)
        x = x.to(self.device, self.sae.W_dec.dtype) * self.scale
        err = (x - self.sae(x)).pow(2).sum(-1).double()
        probs = err.pow(2).cpu()
        if float(probs.sum()) <= 0:
            return 0
        pick = torch.multinomial(probs, dead.numel(), replacement=True, generator=self.generator)
        dirs = x[pick.to(self.device)] - self.sae.b_dec
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive = self.tokens_since_fired < window
        enc_norm = (
            float(self.sae.W_enc[:, alive].norm(dim=0).mean()) if bool(alive.any()) else 1.0
        )
        self.sae.reinit_latents(dead, dirs, 0.2 * enc_norm)
        # The optimiser forgets the restarted latents: it sees every latent-indexed parameter
        # with latents first (the encoder as its rows).
        for (name, _), (_, view) in zip(self.sae.named_parameters(), self._steps_as, strict=True):
            if name != "b_dec":
                optim.forget_rows(self.optimizer, view, dead)
        self.tokens_since_fired[dead] = 0
        return int(dead.numel())

    # ------------------------------------------------------------------ the loop
    def run(self) -> SAE:
        if self.begin():
            return self.end()
        cfg = self.cfg
        bar = tqdm(
            total=self.steps * cfg.batch_size, initial=self.step * cfg.batch_size,
            unit="tok", unit_scale=True, dynamic_ncols=True, disable=not cfg.progress,
            desc=f"train {self.sae_cfg.architecture}",
        )
        batches = self.source.batches(cfg.batch_size, cfg.seed, start_step=self.step)
        try:
            while self.step < self.steps:
                record = self.train_step(next(batches))
                bar.update(cfg.batch_size)
                if record is not None:
                    bar.set_postfix(fvu=f"{record['fvu']:.4f}", l0=f"{record['l0']:.1f}",
                                    dead=f"{100 * record['dead_fraction']:.1f}%")
        except BaseException:
            self._release_memory()
            raise
        finally:
            bar.close()
        return self.end()

    def _release_memory(self) -> None:
        if self._retaining is not None:
            self._retaining()  # a finalizer runs once, here or when the trainer is collected
            self._retaining = None

    def begin(self) -> bool:
        """Reuse the finished SAE in ``out_dir``, resume from the checkpoint or initialise from
        the data; True if already finished."""
        if self._reuse():
            return True
        resumed = self._try_resume()
        if self.finished:
            return True
        if self.out_dir is not None and self.out_dir.is_dir() and self.comm.is_main:
            stage.clear(self.out_dir)  # the folder is about to change: it is no finished run now
        if not resumed:
            self._resolve_matmul_dtype()
        elif self.cfg.progress and self.comm.is_main:
            tqdm.write(f"train: resuming at step {self.step}; {self.optimizer_name} at LR {self.lr:.2e}; "
                       f"{self.matmul_why}")
        if not resumed:
            self._init_from_data()
            if self.out_dir is not None and self.comm.is_main:
                (self.out_dir / METRICS).unlink(missing_ok=True)
        else:
            self._truncate_log(self.step)
        self._ctx = TrainContext(comm=self.comm)
        self._t0, self._tokens_at_t0 = time.perf_counter(), self.step * self.cfg.batch_size
        if self.device.type == "cpu" and self._retaining is None:
            # Reuse each step's freed blocks instead of faulting in fresh pages, where there is
            # room: parameters, gradients and Adam's moments, and two dense [batch, n] buffers.
            params = sum(p.numel() * p.element_size() for p in self.sae.parameters())
            footprint = 4 * params + 2 * 4 * self.cfg.batch_size * self.n
            if memory.retain(footprint):
                self._retaining = weakref.finalize(self, memory.release)
        self._elapsed_before = self.elapsed
        return False

    def train_step(self, batch: Tensor | tuple[Tensor, Tensor]) -> dict[str, Any] | None:
        """One optimiser step on ``batch`` (raw activations, or a transcoder's (input, target));
        the metrics record when this step logs, else None. Checkpoints on schedule."""
        cfg, sae, ctx = self.cfg, self.sae, self._ctx
        inputs, targets = batch if isinstance(batch, tuple) else (batch, None)
        x = self.comm.local_rows(inputs).to(self.device, sae.W_dec.dtype, non_blocking=True)
        x = x * self.scale
        y = None
        if targets is not None:
            y = self.comm.local_rows(targets).to(self.device, sae.W_dec.dtype, non_blocking=True)
            y = y * self.target_scale
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ctx.sparsity_coefficient = self.sparsity_coefficient_at(self.step)
        dead = self.dead_mask()
        ctx.dead_mask = dead

        with self._autocast():
            out = sae.training_forward(x, ctx, target=y)
        fired = self.comm.any_rank(out.fired)  # a latent fired if it fired on any rank's rows
        if not torch.isfinite(out.loss):
            self._diverged(float(out.loss.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        sae.zero_grad(set_to_none=True)
        out.loss.backward()
        self.comm.sync_gradients(sae.parameters(), sae.b_dec)
        if sae.unit_norm_decoder:
            sae.remove_parallel_gradient()
        for p, view in self._steps_as:
            if view is not p:
                view.grad = p.grad.t() if p.grad is not None else None
        self.optimizer.step()
        if sae.unit_norm_decoder:
            sae.normalize_decoder()

        self.tokens_since_fired += x.shape[0] * self.comm.dp
        self.tokens_since_fired[fired] = 0
        self.step += 1
        every = self.sae_cfg.sae.resampling_interval()
        if every and self.step % every == 0 and self.step < self.steps:
            self._resample_dead()

        record = None
        now = time.perf_counter()
        if self.step % cfg.log_every_steps == 0 or self.step == self.steps:
            rate = (self.step * cfg.batch_size - self._tokens_at_t0) / max(now - self._t0, 1e-9)
            self.elapsed = self._elapsed_before + now - self._t0
            record = self._log(out, x if y is None else y, lr, ctx.sparsity_coefficient, dead, rate)
        if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0 \
                and self.step < self.steps:
            self.elapsed = self._elapsed_before + now - self._t0
            self.save_checkpoint()
        return record

    def _resolve_matmul_dtype(self) -> None:
        """What ``matmul_dtype`` runs as: 'auto' times the run's matmul in bfloat16 and float32."""
        asked = self.cfg.matmul_dtype
        if asked == "auto" and self.cfg.dtype == "float32":
            self.matmul_dtype, self.matmul_why = pick_matmul_dtype(
                self.device, self.sae_cfg.d_in, self.sae.n_latents)
            self.matmul_why = "matmul_dtype auto: " + self.matmul_why
        else:
            self.matmul_dtype = None if asked in (None, "auto", self.cfg.dtype) else asked
            self.matmul_why = f"{self.matmul_dtype or self.cfg.dtype} matmuls"
        if self.matmul_dtype == "float32":
            self.matmul_dtype = None
        if self.cfg.progress and self.comm.is_main:
            tqdm.write(f"train: {self.optimizer_name} at LR {self.lr:.2e}; {self.matmul_why}")

    def evaluating(self, on: bool) -> None:
        """Put the weights an evaluation should see in the SAE (a schedule-free optimiser's
        average; what Adam trains needs nothing), or the training weights back. The SAE that
        ``end()`` saves is the former."""
        optim.averaged(self.optimizer, on)

    def _autocast(self) -> Any:
        """Mixed precision (``matmul_dtype``): the dense matmuls run in that dtype; parameters,
        optimiser state, the loss and the sparse backward stay in ``dtype``."""
        low = self.matmul_dtype
        enabled = low is not None and low != self.cfg.dtype
        return torch.autocast(self.device.type, dtype=getattr(torch, low or "bfloat16"),
                              enabled=enabled)

    def end(self) -> SAE:
        """Mark the run finished, write the final checkpoint, save and return the SAE (for a
        run ``begin`` found finished: just return it)."""
        if self.reused is not None:
            return self.reused
        if self.finished:
            return self._finish(already=True)
        self.elapsed = self._elapsed_before + time.perf_counter() - self._t0
        self.finished = True
        self._ctx.workspace.clear()  # the step's scratch (hundreds of MB for a large dictionary)
        self._release_memory()
        self.save_checkpoint()
        return self._finish()

    def _diverged(self, value: float) -> None:
        where = (
            f"the last good checkpoint (step {self.last_checkpoint_step}) is kept in "
            f"{self._checkpoint_path()}"
            if self.last_checkpoint_step is not None else "no checkpoint was written yet"
        )
        raise TrainingDiverged(
            f"training stopped: the loss became {value} at step {self.step + 1}; {where}. "
            "Lower --lr, or check the activations for extreme values",
            step=self.step + 1,
        )

    def _log(self, out: Any, x: Tensor, lr: float, coef: float, dead: Tensor,
             rate: float) -> dict[str, Any]:
        """The metrics record (the main process's rows; the dead fraction of all latents),
        appended to metrics.jsonl by the main process."""
        dead = self.comm.gather_latents(dead, 0)
        record: dict[str, Any] = {
            "step": self.step,
            "tokens": self.step * self.cfg.batch_size,
            "loss": float(out.loss.detach()),
            **{k: float(v) for k, v in out.terms.items()},
            "fvu": fvu(x, out.recon.detach()),
            "l0": float(out.l0),
            "dead_fraction": float(dead.float().mean()),
            "lr": lr,
            "sparsity_coefficient": coef,
            "tokens_per_s": rate,
            "elapsed_s": self.elapsed,
        }
        if self.out_dir is not None and self.comm.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from."""
        if self.out_dir is None or not self.comm.is_main or not (self.out_dir / METRICS).exists():
            return
        lines = (self.out_dir / METRICS).read_text(encoding="utf-8").splitlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                break  # a line torn by the crash: nothing after it is trustworthy
        atomic_write_text(self.out_dir / METRICS, "".join(line + "\n" for line in keep))

    def _finish(self, already: bool = False) -> SAE:
        """The SAE for raw inputs (a schedule-free optimiser's average): a copy with the input
        scale folded in, saved to out_dir."""
        self.evaluating(True)
        final = create(self.sae_cfg).to(self.device)
        final.load_state_dict(self._gather_state(self.sae.state_dict()))
        final.fold_input_scale(self.scale, self.target_scale)
        final.cfg = self.sae_cfg.model_copy(update={
            "activation_norm_scale": self.scale,
            "target_norm_scale": self.target_scale if final.reads_pairs else None})
        if self.out_dir is not None and self.comm.is_main \
                and not (already and (self.out_dir / CFG_FILENAME).exists()):
            final.save(self.out_dir)
        if self.out_dir is not None and self.comm.is_main:
            stage.mark_finished(self.out_dir, self.settings, {
                "architecture": self.sae_cfg.architecture, "n_latents": self.n, "d_in": self.sae_cfg.d_in,
                "steps": self.steps, "tokens": self.steps * self.cfg.batch_size,
                "optimizer": self.optimizer_name, "matmul_dtype": self.matmul_dtype or self.cfg.dtype},
                seconds=self.elapsed)
        self.comm.barrier()
        final.eval()
        return final


def run_settings(cfg: TrainConfig) -> stage.Settings:
    """The settings that decide a training run's result (what its checkpoint and its
    completion marker record)."""
    return stage.Settings.of("training run", resolve_defaults(cfg).model_dump(), free=RESUMABLE_CHANGES)


def train_sae(
    data: ActivationSource | Tensor | np.ndarray | str | Path,
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    **overrides: Any,
) -> SAE:
    """Train an SAE on ``data`` (a tensor, a .npy / .safetensors path, or a source).

    ``overrides`` are TrainConfig fields, e.g. ``train_sae(x, architecture="relu",
    n_latents=1024, tokens=500_000)``. With ``out_dir`` the run checkpoints and resumes.
    """
    if config is None:
        config = build(TrainConfig, **overrides)
    elif overrides:
        config = build(TrainConfig, **{**config.model_dump(), **overrides})
    source = open_source(data, drop_nonfinite=config.drop_nonfinite, allow_incomplete=config.allow_incomplete)
    return Trainer(source, config, out_dir).run()
