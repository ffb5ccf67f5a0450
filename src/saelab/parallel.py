"""How the processes of one training run talk: a communicator handed to the one training loop.

:class:`Communicator` is the single-process form: every method is the identity or does nothing,
so the loop and the architectures call it unconditionally. :class:`TorchCommunicator` runs the
same calls over torch.distributed (launched by ``torchrun``), on a 2-D process grid
``data_parallel x latent_shards``:

* **Data parallel.** Each data-parallel rank takes its own slice of every global batch (rows
  ``[r·B/dp, (r+1)·B/dp)``) and the gradients are averaged across the data-parallel group, so
  the step is the one a single process takes on the whole batch.
* **Latent sharding**, for dictionaries too large for one device (an encode/decode strategy of
  the architectures that support it: TopK): each rank of a latent-shard group owns a contiguous
  slice of the latents. Each rank takes its local top-k, the candidates are gathered and the
  global top-k is chosen from them (the global top-k is always among the local ones); each rank
  decodes its chosen latents and the partial reconstructions are summed across the group.
  ``b_dec`` is replicated: its gradient is summed over the group (every rank holds the
  encoder-side part of it, rank 0 also the decoder-side part).

Checkpoints gather the whole SAE to rank 0 and are written in the single-process format, so a
run resumes on any number of processes. Backends: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import Tensor

from saelab.errors import InputError


class Communicator:
    """One process: the identity for every collective."""

    world = 1
    rank = 0
    dp, dp_rank = 1, 0
    ls, ls_rank = 1, 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes the files and shows the progress."""
        return self.rank == 0

    def describe(self) -> str:
        return ""

    # ------------------------------------------------------------------ data parallel
    def local_rows(self, batch: Tensor) -> Tensor:
        """This process's rows of a global batch."""
        return batch

    def any_rank(self, mask: Tensor) -> Tensor:
        """A bool mask true where it is true on any data-parallel rank."""
        return mask

    def sync_gradients(self, params: Iterable[torch.nn.Parameter], shared: torch.nn.Parameter) -> None:
        """Sum ``shared``'s gradient over the latent shards, average every gradient over the
        data-parallel ranks."""

    # ------------------------------------------------------------------ latent shards
    def local_latents(self, n_latents: int) -> int:
        """How many of ``n_latents`` latents this process owns."""
        return n_latents

    def select_top(self, values: Tensor, k: int) -> Tensor | None:
        """Which of this shard's candidate ``values`` [B, c] are among the global top ``k`` of
        their row (a bool mask), or None on one shard (all of them)."""
        return None

    def sum_shards(self, partial: Tensor) -> Tensor:
        """The sum over the latent shards of ``partial``, with gradient to this shard's part."""
        return partial

    def sum_shards_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the latent shards in place (no gradient): counts, totals."""
        return t

    def shard_bias(self, b_dec: Tensor) -> Tensor:
        """The decoder bias as this shard adds it: with gradient on one shard only."""
        return b_dec

    def gather_latents(self, t: Tensor, dim: int | None) -> Tensor:
        """The whole tensor from each shard's slice along ``dim`` (None: replicated)."""
        return t

    def slice_latents(self, t: Tensor, dim: int | None) -> Tensor:
        """This shard's slice of a whole tensor along ``dim`` (None: replicated)."""
        return t

    def barrier(self) -> None:
        """Wait for every process."""

    def close(self) -> None:
        """Leave the process group."""


SINGLE = Communicator()


def init_from_env(latent_shards: int = 1) -> tuple[TorchCommunicator, torch.device]:
    """Join the process group ``torchrun`` describes in the environment."""
    import torch.distributed as dist

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
    return TorchCommunicator(latent_shards), device


class TorchCommunicator(Communicator):
    """The collectives over torch.distributed on a ``data_parallel x latent_shards`` grid."""

    def __init__(self, latent_shards: int = 1) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        if latent_shards < 1 or self.world % latent_shards:
            raise InputError(f"--latent-shards {latent_shards} does not divide the {self.world} processes")
        self.ls, self.dp = latent_shards, self.world // latent_shards
        self.dp_rank, self.ls_rank = self.rank // latent_shards, self.rank % latent_shards
        # Every rank must create every group, in the same order.
        self.ls_group = self.dp_group = None
        for d in range(self.dp):
            g = dist.new_group([d * self.ls + j for j in range(self.ls)])
            if d == self.dp_rank:
                self.ls_group = g
        for j in range(self.ls):
            g = dist.new_group([d * self.ls + j for d in range(self.dp)])
            if j == self.ls_rank:
                self.dp_group = g

    def describe(self) -> str:
        return f" on {self.world} processes ({self.dp} data-parallel x {self.ls} latent shards)"

    def local_rows(self, batch: Tensor) -> Tensor:
        if batch.shape[0] % self.dp:
            raise InputError(f"--batch-size {batch.shape[0]} must divide evenly over {self.dp} "
                             "data-parallel ranks")
        rows = batch.shape[0] // self.dp
        return batch[self.dp_rank * rows : (self.dp_rank + 1) * rows]

    def any_rank(self, mask: Tensor) -> Tensor:
        if self.dp == 1:
            return mask
        as_int = mask.to(torch.int32)
        self._dist.all_reduce(as_int, self._dist.ReduceOp.MAX, group=self.dp_group)
        return as_int.bool()

    def sync_gradients(self, params: Iterable[torch.nn.Parameter], shared: torch.nn.Parameter) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if self.ls > 1 and shared.grad is not None:
            self._dist.all_reduce(shared.grad, group=self.ls_group)
        if self.dp > 1:
            for g in grads:
                self._dist.all_reduce(g, group=self.dp_group)
                g /= self.dp

    def local_latents(self, n_latents: int) -> int:
        if n_latents % self.ls:
            raise InputError(f"{n_latents} latents do not split evenly over {self.ls} latent shards")
        return n_latents // self.ls

    def select_top(self, values: Tensor, k: int) -> Tensor | None:
        if self.ls == 1:
            return None
        c = values.shape[1]
        gathered = [torch.empty_like(values) for _ in range(self.ls)]
        self._dist.all_gather(gathered, values.detach().contiguous(), group=self.ls_group)
        top = torch.cat(gathered, dim=1).topk(k, dim=1, sorted=False).indices
        chosen = torch.zeros(values.shape[0], c * self.ls, dtype=torch.bool, device=values.device)
        chosen.scatter_(1, top, True)
        return chosen[:, self.ls_rank * c : (self.ls_rank + 1) * c]

    def sum_shards(self, partial: Tensor) -> Tensor:
        if self.ls == 1:
            return partial
        total = partial.detach().clone()
        self._dist.all_reduce(total, group=self.ls_group)
        return partial + (total - partial.detach())

    def sum_shards_(self, t: Tensor) -> Tensor:
        if self.ls > 1:
            self._dist.all_reduce(t, group=self.ls_group)
        return t

    def shard_bias(self, b_dec: Tensor) -> Tensor:
        return b_dec if self.ls_rank == 0 else b_dec.detach()

    def gather_latents(self, t: Tensor, dim: int | None) -> Tensor:
        if dim is None or self.ls == 1:
            return t
        rows = (t.transpose(0, dim) if dim else t).contiguous()
        parts = [torch.empty_like(rows) for _ in range(self.ls)]
        self._dist.all_gather(parts, rows, group=self.ls_group)
        full = torch.cat(parts, 0)
        return full.transpose(0, dim) if dim else full

    def slice_latents(self, t: Tensor, dim: int | None) -> Tensor:
        if dim is None or self.ls == 1:
            return t
        n_local = t.shape[dim] // self.ls
        return t.narrow(dim, self.ls_rank * n_local, n_local)

    def barrier(self) -> None:
        self._dist.barrier()

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


__all__ = ["SINGLE", "Communicator", "TorchCommunicator", "init_from_env"]
