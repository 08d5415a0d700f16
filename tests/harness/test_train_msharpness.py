"""m-sharpness training (Foret et al., §4.1): one perturbation per subset of m examples of each batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from sharpness.harness.config import load_config
from sharpness.harness.train import Trainer

TINY = ["epochs=1", "train_subset=256", "batch_size=64", "model_kwargs={width: 4}", "device=cpu"]


def _weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_m_equal_to_the_batch_is_plain_sam_bit_for_bit(tmp_path, precision):
    plain = load_config("demo-digits", [*TINY, "augment=cutout", "cutout_size=4", f"precision={precision}"])
    whole = load_config(
        "demo-digits", [*TINY, "augment=cutout", "cutout_size=4", f"precision={precision}", "m_sharpness=64"]
    )
    Trainer(plain, tmp_path / "plain", progress=False).run()
    Trainer(whole, tmp_path / "whole", progress=False).run()
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Captures(Trainer):
    """Keeps the (un-augmented) inputs and the weights of the first step."""

    def _step(self, images, labels, acc):
        if not hasattr(self, "first"):
            w0 = {k: v.detach().clone() for k, v in self.model.named_parameters()}
            self.first = (self.augment.normalize(images), labels.clone(), w0)
        super()._step(images, labels, acc)


def _reference_step(model, x, y, w0, m, rho, lr, weight_decay):
    """One SGD step (first momentum step: the gradient itself) on sum_i |S_i|/n grad L_{S_i}(w + eps_i), in float64."""
    names = list(w0)
    ref = copy.deepcopy(model).double()
    w = [w0[k].double() for k in names]

    def grad(values, xs, ys):
        leaves = [v.clone().requires_grad_() for v in values]
        loss = F.cross_entropy(functional_call(ref, dict(zip(names, leaves, strict=True)), (xs.double(),)), ys)
        return torch.autograd.grad(loss, leaves)

    total = [torch.zeros_like(t) for t in w]
    for xs, ys in zip(x.split(m), y.split(m), strict=True):
        g = grad(w, xs, ys)
        norm = torch.cat([t.flatten() for t in g]).norm()
        for acc, h in zip(total, grad([t + rho * gi / norm for t, gi in zip(w, g, strict=True)], xs, ys), strict=True):
            acc += h * len(ys) / len(y)
    return {k: t - lr * (gt + weight_decay * t) for k, t, gt in zip(names, w, total, strict=True)}


def test_m_smaller_than_the_batch_perturbs_each_subset_by_its_own_gradient(tmp_path):
    one_step = [
        "epochs=1",
        "train_subset=64",
        "batch_size=64",
        "model=mlp",
        "model_kwargs={hidden: 16}",
        "augment=none",
        "schedule=constant",
        "rho=0.05",
        "device=cpu",
    ]
    runs = {}
    for m in (16, 64):
        cfg = load_config("demo-digits", [*one_step, f"m_sharpness={m}"])
        runs[m] = _Captures(cfg, tmp_path / f"m{m}", progress=False)
        runs[m].run()
    x, y, w0 = runs[16].first
    expected = _reference_step(runs[16].model, x, y, w0, m=16, rho=0.05, lr=0.05, weight_decay=5e-4)
    got, plain = _weights(tmp_path / "m16"), _weights(tmp_path / "m64")
    for k, want in expected.items():
        torch.testing.assert_close(got[k].double(), want, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(got[k], plain[k], rtol=1e-4, atol=1e-5) for k in got)  # not plain SAM's step
    whole = _reference_step(runs[64].model, x, y, w0, m=64, rho=0.05, lr=0.05, weight_decay=5e-4)
    for k, want in whole.items():
        torch.testing.assert_close(plain[k].double(), want, rtol=1e-5, atol=1e-6)


def test_metrics_of_an_m_sharpness_run_come_from_the_clean_passes(tmp_path):
    """Per step, the subsets' clean losses weighted by their share; with two ascent steps per subset the passes
    run clean, perturbed, perturbed for each subset in turn."""

    class RecordsLosses(Trainer):
        def _loss(self, x, y):
            out = super()._loss(x, y)
            self.__dict__.setdefault("losses", []).append(out[0].detach().clone())
            return out

    cfg = load_config("demo-digits", [*TINY, "m_sharpness=16", "ascent_steps=2"])
    trainer = RecordsLosses(cfg, tmp_path / "run", progress=False)
    summary = trainer.run()
    clean = trainer.losses[::3]  # 3 passes per subset
    assert len(clean) == 4 * 4  # 4 steps of 4 subsets
    total = torch.zeros(())
    for step in range(4):
        total += torch.stack([c * 0.25 for c in clean[4 * step : 4 * step + 4]]).sum() * 64
    assert summary["metrics"]["train_loss"] == float(total) / 256
