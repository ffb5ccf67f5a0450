"""Training on several processes with torch.distributed (launched by ``torchrun``).

The processes form a 2-D grid, ``data_parallel x latent_shards``:

* **Data parallel.** Each data-parallel rank takes its own slice of every global batch
  (rows ``[r·B/dp, (r+1)·B/dp)``) and the gradients are averaged across the data-parallel
  group, so the step is the one a single process takes on the whole batch.
* **Latent sharding** (TopK), for dictionaries too large for one device: each rank of a
  latent-shard group owns a contiguous slice of the latents (encoder columns, encoder bias,
  decoder rows). Each rank takes its local top-k, the candidates are gathered, and the
  global top-k is chosen from them (the global top-k is always among the local top-k's);
  each rank decodes its chosen latents and the partial reconstructions are summed across
  the group. AuxK works the same way over the dead latents. ``b_dec`` is replicated; its
  gradient is summed over the group (each rank holds the encoder-side part of it, rank 0
  also the decoder-side part).

Checkpoints hold the whole SAE and optimiser state, gathered to rank 0 and written in the
single-process format, so a run resumes on any number of ranks (or on one process), and
the saved SAE is the ordinary SAELens-layout folder. Backends: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from saelab.activations.source import ActivationSource
from saelab.config import TrainConfig
from saelab.errors import InputError
from saelab.io import atomic_torch_save
from saelab.sae.base import CFG_FILENAME, SAE, ForwardOutput, TrainContext, create, squared_error
from saelab.sae.kernels import sparse_decode, topk_encode
from saelab.train.trainer import Trainer

# Which dimension of each parameter is split across latent shards (None: replicated).
SHARD_DIM = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "b_dec": None}


def init_from_env() -> tuple[int, int, torch.device]:
    """Join the process group ``torchrun`` describes in the environment; (rank, world, device)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise InputError("--distributed needs torchrun: torchrun --nproc-per-node N -m saelab train "
                         "--distributed ...")
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


class DistributedTrainer(Trainer):
    """A :class:`Trainer` over a ``data_parallel x latent_shards`` process grid (see the
    module docstring). Every rank runs it; rank 0 writes the files."""

    def __init__(self, source: ActivationSource, cfg: TrainConfig, out_dir: str | Path | None = None,
                 latent_shards: int = 1) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        if latent_shards < 1 or world % latent_shards:
            raise InputError(f"--latent-shards {latent_shards} does not divide the {world} processes")
        self.ls, self.dp = latent_shards, world // latent_shards
        self.rank, self.dp_rank, self.ls_rank = rank, rank // latent_shards, rank % latent_shards
        if cfg.batch_size % self.dp:
            raise InputError(f"--batch-size {cfg.batch_size} must divide evenly over {self.dp} "
                             "data-parallel ranks")
        if self.ls > 1 and cfg.architecture != "topk":
            raise InputError(f"latent sharding is for TopK SAEs, not {cfg.architecture}; "
                             "use data parallelism alone (--latent-shards 1)")
        self.ls_group, self.dp_group = self._groups(world)
        super().__init__(source, cfg.model_copy(update={"progress": cfg.progress and rank == 0}), out_dir)
        self.data_parallel = self.dp
        n = self.sae_cfg.n_latents
        if n % self.ls:
            raise InputError(f"{n} latents do not split evenly over {self.ls} latent shards")
        self.n_local = n // self.ls
        if self.ls > 1:
            if self.sae_cfg.k is not None and self.sae_cfg.k >= self.n_local:
                raise InputError(f"k = {self.sae_cfg.k} must be below the {self.n_local} latents of a shard")
            full = self.sae
            local_cfg = self.sae_cfg.model_copy(update={"n_latents": self.n_local})
            self.sae = create(local_cfg).to(self.device)
            self.sae.load_state_dict(self._slice_model(full.state_dict()))
            self._make_optimizer()
            self.tokens_since_fired = torch.zeros(self.n_local, dtype=torch.long, device=self.device)

    def _groups(self, world: int) -> tuple[Any, Any]:
        """Every rank must create every group, in the same order."""
        ls_group = dp_group = None
        for d in range(world // self.ls):
            g = dist.new_group([d * self.ls + j for j in range(self.ls)])
            if d == self.dp_rank:
                ls_group = g
        for j in range(self.ls):
            g = dist.new_group([d * self.ls + j for d in range(world // self.ls)])
            if j == self.ls_rank:
                dp_group = g
        return ls_group, dp_group

    # ------------------------------------------------------------------ data
    def batches_for_rank(self, batch: Tensor) -> Tensor:
        rows = batch.shape[0] // self.dp
        return batch[self.dp_rank * rows : (self.dp_rank + 1) * rows]

    def train_step(self, batch: Tensor) -> dict[str, Any] | None:
        return super().train_step(self.batches_for_rank(batch))

    # ------------------------------------------------------------------ forward and gradients
    def _forward(self, x: Tensor, ctx: TrainContext) -> ForwardOutput:
        out = self._sharded_forward(x, ctx) if self.ls > 1 else self.sae.training_forward(x, ctx)
        if self.dp > 1:  # a latent fired if it fired on any rank's rows
            fired = out.fired.to(torch.int32)
            dist.all_reduce(fired, dist.ReduceOp.MAX, group=self.dp_group)
            out = out._replace(fired=fired.bool())
        return out

    def _select(self, values: Tensor, indices: Tensor, k: int) -> Tensor:
        """Which of this rank's candidates are among the global top ``k`` of each row."""
        c = values.shape[1]
        gathered = [torch.empty_like(values) for _ in range(self.ls)]
        dist.all_gather(gathered, values.detach().contiguous(), group=self.ls_group)
        top = torch.cat(gathered, dim=1).topk(k, dim=1, sorted=False).indices
        chosen = torch.zeros(values.shape[0], c * self.ls, dtype=torch.bool, device=values.device)
        chosen.scatter_(1, top, True)
        return chosen[:, self.ls_rank * c : (self.ls_rank + 1) * c]

    def _sum(self, partial: Tensor) -> Tensor:
        """The sum over the latent-shard group of ``partial``, with gradient to this rank's."""
        total = partial.detach().clone()
        dist.all_reduce(total, group=self.ls_group)
        return partial + (total - partial.detach())

    def _sharded_forward(self, x: Tensor, ctx: TrainContext) -> ForwardOutput:
        sae, k = self.sae, int(self.sae_cfg.k or 0)
        k_aux = 0
        if ctx.k_aux > 0 and ctx.dead_mask is not None:
            n_dead = ctx.dead_mask.sum().reshape(1)
            dist.all_reduce(n_dead, group=self.ls_group)
            k_aux = min(ctx.k_aux, int(n_dead))
        codes = topk_encode(x - sae.b_dec, sae.enc_rows, sae.b_enc, k,
                            ctx.dead_mask if k_aux > 0 else None, min(k_aux, self.n_local),
                            ctx.workspace)
        values = codes.values * self._select(codes.values, codes.indices, k)
        b_dec = sae.b_dec if self.ls_rank == 0 else sae.b_dec.detach()
        recon = self._sum(sparse_decode(values, codes.indices, sae.W_dec)) + b_dec
        mse = squared_error(x, recon)
        aux = x.new_zeros(())
        if k_aux > 0 and codes.aux_values is not None and codes.aux_indices is not None:
            aux_values = codes.aux_values * self._select(codes.aux_values, codes.aux_indices, k_aux)
            aux_recon = self._sum(sparse_decode(aux_values, codes.aux_indices, sae.W_dec))
            aux = squared_error((x - recon).detach(), aux_recon)
        loss = mse + ctx.aux_k_coefficient * aux
        fired = torch.zeros(self.n_local, dtype=torch.bool, device=x.device)
        fired[codes.indices[values > 0]] = True
        active = (values > 0).sum(-1).float()
        dist.all_reduce(active, group=self.ls_group)
        return ForwardOutput(recon, loss, {"mse": mse.detach(), "auxk": aux.detach()}, fired, active.mean())

    def _sync_gradients(self) -> None:
        params = [p for p in self.sae.parameters() if p.grad is not None]
        if self.ls > 1 and self.sae.b_dec.grad is not None:
            dist.all_reduce(self.sae.b_dec.grad, group=self.ls_group)
        if self.dp > 1:
            for p in params:
                dist.all_reduce(p.grad, group=self.dp_group)
                p.grad /= self.dp

    # ------------------------------------------------------------------ whole-SAE state
    def _slice(self, t: Tensor, dim: int | None) -> Tensor:
        if dim is None or self.ls == 1:
            return t
        return t.narrow(dim, self.ls_rank * self.n_local, self.n_local)

    def _gather(self, t: Tensor, dim: int | None) -> Tensor:
        if dim is None or self.ls == 1:
            return t
        rows = (t.transpose(0, dim) if dim else t).contiguous()
        parts = [torch.empty_like(rows) for _ in range(self.ls)]
        dist.all_gather(parts, rows, group=self.ls_group)
        full = torch.cat(parts, 0)
        return full.transpose(0, dim) if dim else full

    def _slice_model(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: self._slice(t, SHARD_DIM[name]) for name, t in state.items()}

    def _optimizer_state(self, transform: Any, opt_state: dict[str, Any]) -> dict[str, Any]:
        names = [name for name, _ in self.sae.named_parameters()]
        state = {
            i: {key: transform(v, SHARD_DIM[names[i]]) if key != "step" else v for key, v in s.items()}
            for i, s in opt_state["state"].items()
        }
        return {"state": state, "param_groups": opt_state["param_groups"]}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.ls > 1:
            state["model"] = {name: self._gather(t, SHARD_DIM[name]) for name, t in state["model"].items()}
            state["optimizer"] = self._optimizer_state(self._gather, state["optimizer"])
            state["tokens_since_fired"] = self._gather(self.tokens_since_fired, 0).cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ls > 1:
            state = {
                **state,
                "model": self._slice_model(state["model"]),
                "optimizer": self._optimizer_state(self._slice, state["optimizer"]),
                "tokens_since_fired": self._slice(state["tokens_since_fired"], 0),
            }
        super().load_state_dict(state)

    def save_checkpoint(self) -> None:
        path = self._checkpoint_path()
        if path is None:
            return
        state = self.state_dict()  # collective: every rank takes part
        if self.rank == 0:
            atomic_torch_save(state, path)
        self.last_checkpoint_step = self.step
        dist.barrier()

    def _log(self, out: Any, x: Tensor, lr: float, coef: float, dead: Tensor, rate: float) -> dict[str, Any]:
        """Rank 0 writes the log: the loss and FVU of its rows, the dead fraction of all latents."""
        dead = self._gather(dead, 0)
        out_dir = self.out_dir
        if self.rank != 0:
            self.out_dir = None
        try:
            return super()._log(out, x, lr, coef, dead, rate)
        finally:
            self.out_dir = out_dir

    def _truncate_log(self, step: int) -> None:
        if self.rank == 0:
            super()._truncate_log(step)

    def _finish(self, already: bool = False) -> SAE:
        full_state = {name: self._gather(t, SHARD_DIM[name]) for name, t in self.sae.state_dict().items()}
        final = create(self.sae_cfg).to(self.device)
        final.load_state_dict(full_state)
        final.fold_input_scale(self.scale)
        final.cfg = self.sae_cfg.model_copy(update={"activation_norm_scale": self.scale})
        if self.rank == 0 and self.out_dir is not None \
                and not (already and (self.out_dir / CFG_FILENAME).exists()):
            final.save(self.out_dir)
        dist.barrier()
        final.eval()
        return final
