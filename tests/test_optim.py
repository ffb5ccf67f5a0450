"""The optimisers and the matmul dtype: schedule-free signum is the arithmetic of the
``schedulefree`` package's wrapper, saves its average, and learns faster per token than Adam at
short budgets; ``matmul_dtype="auto"`` takes bfloat16 only where it is faster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saelab import TrainConfig
from saelab.activations.source import MatrixSource
from saelab.data.toy import ToyDataConfig, make_toy_data
from saelab.device import pick_matmul_dtype
from saelab.eval.metrics import evaluate_reconstruction, mmcs
from saelab.train import optim
from saelab.train.trainer import Trainer


class SignSGD(torch.optim.Optimizer):
    """Plain sign descent (sparsify's ``SignSGD``): the base the wrapper makes schedule-free."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def test_schedule_free_signum_is_the_schedulefree_wrapper_around_sign_descent() -> None:
    """Same iterates y, same average x, through an LR that changes (so the average's weights
    differ): against schedulefree's own ScheduleFreeWrapper(SignSGD, momentum=0.95)."""
    schedulefree = pytest.importorskip("schedulefree")
    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(7, 5, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    ours = optim.ScheduleFreeSignum([a], lr=0.05)
    ref = schedulefree.ScheduleFreeWrapper(SignSGD([b], lr=0.05), momentum=0.95)
    ref.train()
    target = torch.randn(7, 5, generator=g)
    for step in range(40):
        lr = 0.05 * min(1.0, (step + 1) / 10)
        for opt, p in ((ours, a), (ref, b)):
            for group in opt.param_groups:
                group["lr"] = lr
            loss = (p - target).pow(3).abs().sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
        assert torch.allclose(a, b, atol=1e-6), step
    ours.eval()
    ref.eval()
    assert torch.allclose(a, b, atol=1e-6)
    ours.train()
    ref.train()
    assert torch.allclose(a, b, atol=1e-6)


@pytest.fixture(scope="module")
def superposed():
    data = make_toy_data(ToyDataConfig(d_in=64, n_features=256, avg_active=4, seed=5))
    x, _ = data.sample(120_000, seed=1)
    x_eval, _ = data.sample(8_192, seed=2)
    return data, x, x_eval


def test_signum_saves_its_average_and_beats_adam_at_a_short_budget(superposed, tmp_path: Path) -> None:
    """At each optimiser's default LR rule and schedule, a TopK run of 60k rows: signum ends with
    lower held-out FVU and higher MMCS than Adam; what it saves is the average
    x = (y - (1-β) z) / β of the iterates, not the point y it trained at."""
    data, x, x_eval = superposed
    common = dict(architecture="topk", k=4, n_latents=512, tokens=60_000, batch_size=512, progress=False,
                  checkpoint_every_steps=0, seed=0, device="cpu")
    results = {}
    for name in ("adam", "signum"):
        t = Trainer(MatrixSource(x), TrainConfig(optimizer=name, **common), tmp_path / name)
        assert not t.begin()
        for batch in MatrixSource(x).batches(512, 0):
            if t.step == t.steps:
                break
            t.train_step(batch)
        y = t.sae.W_dec.detach().clone()
        z = t.optimizer.state[t.sae.W_dec].get("z")
        sae = t.end()
        if name == "signum":
            assert not torch.allclose(t.sae.W_dec, y)
            assert torch.allclose(t.sae.W_dec, (y - 0.05 * z) / 0.95, atol=1e-6)
        results[name] = (evaluate_reconstruction(sae, MatrixSource(x_eval).rows(8192)).fvu,
                         mmcs(sae.W_dec, data.features)[0])
    (fvu_adam, mmcs_adam), (fvu_signum, mmcs_signum) = results["adam"], results["signum"]
    assert fvu_signum < fvu_adam, results
    assert mmcs_signum > mmcs_adam, results
    assert TrainConfig().resolved_optimizer() == "signum"
    assert TrainConfig(architecture="relu").resolved_optimizer() == "adam"


def test_cfg_json_records_the_optimizer_and_its_resolved_schedule(superposed, tmp_path: Path) -> None:
    _, x, _ = superposed
    Trainer(MatrixSource(x), TrainConfig(k=4, n_latents=128, tokens=4096, batch_size=512, progress=False),
            tmp_path).run()
    train = json.loads((tmp_path / "cfg.json").read_text())["saelab"]["train"]
    assert (train["optimizer"], train["lr_decay_fraction"], train["matmul_dtype"]) == ("signum", 0.0, "auto")


def native_bf16_cpu() -> bool:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def test_auto_matmul_dtype_takes_bfloat16_only_where_it_is_faster(superposed) -> None:
    """On a CPU without native bfloat16 matmuls (AVX2 only, as on this project's machines) 'auto'
    must pick float32, and then train exactly as matmul_dtype float32 does."""
    choice, why = pick_matmul_dtype(torch.device("cpu"), 64, 512)
    assert choice in ("float32", "bfloat16") and "GFLOP/s" in why
    if not native_bf16_cpu():
        assert choice == "float32", why
    _, x, _ = superposed
    runs = {}
    for dtype in ("auto", choice):
        t = Trainer(MatrixSource(x), TrainConfig(k=4, n_latents=128, tokens=8192, batch_size=512,
                                                 matmul_dtype=dtype, progress=False))
        runs[dtype] = t.run()
        assert t.matmul_why.startswith("matmul_dtype auto" if dtype == "auto" else choice)
    assert torch.equal(runs["auto"].W_dec, runs[choice].W_dec)
