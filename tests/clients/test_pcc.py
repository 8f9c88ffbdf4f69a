"""clients.pcc: the pixel-level cross-correlation loss (hooks, formulas, errors, real MNIST)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clients.pcc import PCCLoss, pixel_correlation
from tests.clients import models
from tests.mnist import load_mnist


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    """One thread and deterministic kernels (2 shared cores: more threads only slow it down)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def small_cnn(*, inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def ref_corr(fm: np.ndarray) -> np.ndarray:
    """np.corrcoef of every sample of (N, C, *positions): (N, C, C)."""
    return np.stack([np.corrcoef(sample.reshape(sample.shape[0], -1)) for sample in fm])


def ref_term(fm: np.ndarray, mode: str) -> float:
    r = ref_corr(fm)
    off = ~np.eye(r.shape[1], dtype=bool)
    values = r[:, off] ** 2 if mode == "decorrelate" else (1 - r[:, off]) ** 2
    return float(values.mean(axis=1).mean())


def hooked_term(fm: torch.Tensor, mode: str = "decorrelate", eps: float = 1e-12) -> torch.Tensor:
    """The unweighted term of a feature map, through a PCCLoss on an identity layer."""
    model = nn.Sequential(nn.Identity())
    with PCCLoss(model, ["0"], weight=1.0, mode=mode, eps=eps) as pcc:  # type: ignore[arg-type]
        model(fm)
        return pcc()


# --------------------------------------------------------------------------- formulas


def test_correlation_matches_np_corrcoef_per_sample() -> None:
    fm = torch.randn(3, 5, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fm[:, 1] += 0.8 * fm[:, 0]  # some real correlation, of both signs
    fm[:, 3] -= 0.5 * fm[:, 2]
    r = pixel_correlation(fm, eps=0.0)
    assert r.shape == (3, 5, 5) and r.dtype == torch.float64
    np.testing.assert_allclose(r.numpy(), ref_corr(fm.numpy()), atol=1e-12)
    r32 = pixel_correlation(fm.float())  # float32 with the default eps
    np.testing.assert_allclose(r32.numpy(), ref_corr(fm.numpy()), atol=1e-5)


def test_correlation_layouts_2d_1d_and_channels_last() -> None:
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(10, 4, dtype=torch.float64, generator=g)  # (N, C): the rows are the pixels
    np.testing.assert_allclose(
        pixel_correlation(rows, eps=0)[0].numpy(), np.corrcoef(rows.numpy().T), atol=1e-12
    )
    seq = torch.randn(2, 3, 7, dtype=torch.float64, generator=g)  # (N, C, L)
    np.testing.assert_allclose(pixel_correlation(seq, eps=0).numpy(), ref_corr(seq.numpy()))
    last = seq.transpose(1, 2)  # (N, L, C) read with channels last
    np.testing.assert_allclose(
        pixel_correlation(last, eps=0, channels_last=True).numpy(), ref_corr(seq.numpy())
    )


@pytest.mark.parametrize("mode", ["decorrelate", "correlate"])
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 9, 2, 2), (8, 3), (2, 4, 11)])
def test_term_matches_the_slow_reference(mode: str, shape: tuple[int, ...]) -> None:
    """Both ways of summing (C×C, and P×P when pixels < channels: (2, 9, 2, 2)) agree with numpy."""
    fm = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fm[:, 1] = fm[:, 1] + fm[:, 0]
    expected = ref_term(fm.numpy() if fm.dim() > 2 else fm.numpy().T[None], mode)
    assert hooked_term(fm, mode).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("mode", ["decorrelate", "correlate"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (2, 6, 2, 1)])
def test_gradient_is_exact(mode: str, shape: tuple[int, ...]) -> None:
    """gradcheck in float64: the detached-mean centering keeps the gradient exact."""
    fm = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    fm.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: hooked_term(t, mode, eps=1e-6), (fm,))
    assert torch.autograd.gradcheck(lambda t: pixel_correlation(t, eps=1e-6), (fm,))


def test_perfectly_correlated_channels_give_one_and_independent_ones_almost_zero() -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 1, 16, 16, generator=g)
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0, 7.0]).view(1, 5, 1, 1)
    same = base * scale + torch.randn(1, 5, 1, 1, generator=g)  # r = 1 for every pair
    assert hooked_term(same, "decorrelate").item() == pytest.approx(1.0, abs=1e-5)
    assert hooked_term(same, "correlate").item() == pytest.approx(0.0, abs=1e-5)
    opposite = torch.cat([base, -base], dim=1)  # r = -1: as redundant (r² = 1), farthest (1-r)²
    assert hooked_term(opposite, "decorrelate").item() == pytest.approx(1.0, abs=1e-5)
    assert hooked_term(opposite, "correlate").item() == pytest.approx(4.0, abs=1e-4)
    independent = torch.randn(4, 8, 64, 64, generator=g)  # E[r²] = 1/P for P = 4096
    assert hooked_term(independent, "decorrelate").item() < 5 / 4096
    assert hooked_term(independent, "correlate").item() == pytest.approx(1.0, abs=0.01)


def test_a_constant_channel_gives_no_nan() -> None:
    fm = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(6))
    fm[:, 2] = 0.7  # e.g. a dead ReLU channel
    fm[0] = 0.0  # a sample where every channel is constant
    fm.requires_grad_(True)
    r = pixel_correlation(fm)
    assert torch.isfinite(r).all()
    assert r[:, 2].abs().max().item() < 1e-6 and r[0].abs().max().item() < 1e-6
    for mode in ("decorrelate", "correlate"):
        term = hooked_term(fm, mode, eps=1e-6)
        (grad,) = torch.autograd.grad(term, fm)
        assert torch.isfinite(term) and torch.isfinite(grad).all()
    # the constant channel adds nothing to Σ r² (6 of the 12 pairs are the other channels')
    others = ref_term(fm[1:, [0, 1, 3]].detach().numpy(), "decorrelate") / 2
    assert hooked_term(fm.detach()[1:], eps=1e-6).item() == pytest.approx(others, rel=1e-4)


# --------------------------------------------------------------------------- the loss on a model


def test_weight_zero_leaves_loss_and_gradients_unchanged() -> None:
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    model = small_cnn()
    task = F.cross_entropy(model(x), y)
    task.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with PCCLoss(model, weight=0.0) as pcc:
        task_again = F.cross_entropy(model(x), y)
        total = task_again + pcc()
        assert torch.equal(total, task) and torch.equal(task_again, task)
        total.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, plain[n]), n


def test_pcc_term_alone_reaches_the_hooked_layers() -> None:
    model = small_cnn()
    with PCCLoss(model, weight=1.0) as pcc:  # default: every conv (here "0" and "2")
        assert pcc.layer_names == ("0", "2")
        model(torch.randn(4, 3, 8, 8))
        loss = pcc()
        assert loss.requires_grad and loss.dim() == 0 and 0 < loss.item() < 1
        loss.backward()
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum().item() > 0, name
    assert model.get_parameter("6.weight").grad is None  # after the last hooked layer: untouched


def test_weight_scales_and_the_loss_is_the_mean_over_layers() -> None:
    model = small_cnn()
    x = torch.randn(4, 3, 8, 8)
    with PCCLoss(model, ["2", model[0]], weight=0.5, mode="correlate") as pcc:
        model(x)
        assert pcc.layer_names == ("2", "0")
        terms = pcc.penalties()
        assert sorted(terms) == ["0", "2"]
        assert pcc.loss().item() == pytest.approx(0.5 * (terms["0"] + terms["2"]).item() / 2)
        pcc.weight = 2.0
        assert pcc().item() == pytest.approx(2.0 * (terms["0"] + terms["2"]).item() / 2)
        assert list(pcc.parameters()) == []  # the model's parameters are not the loss's
        assert "mode='correlate'" in repr(pcc)


def test_each_forward_pass_replaces_the_terms() -> None:
    model = small_cnn()
    with PCCLoss(model, ["0"], weight=1.0) as pcc:
        model(torch.randn(2, 3, 8, 8))
        first = pcc().item()
        model(torch.randn(2, 3, 8, 8))
        assert pcc().item() != first
        with torch.no_grad():  # validation passes work too, without autograd
            model.eval()(torch.randn(2, 3, 8, 8))
        value = pcc()
        assert not value.requires_grad and torch.isfinite(value)


def test_layers_that_did_not_run_are_left_out() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv1d(2, 4, 3)
            self.b = nn.Conv1d(2, 4, 3)

        def forward(self, x: torch.Tensor, use_b: bool = False) -> torch.Tensor:
            return self.b(x) if use_b else self.a(x)

    model = TwoHeads()
    with PCCLoss(model, weight=1.0) as pcc:
        model(torch.randn(2, 2, 10))
        assert list(pcc.penalties()) == ["a"]
        model(torch.randn(2, 2, 10), use_b=True)
        assert list(pcc.penalties()) == ["b"]


def test_an_inplace_activation_after_the_layer_does_not_change_the_term() -> None:
    x = torch.randn(3, 3, 8, 8)
    model = small_cnn(inplace=True)
    expected = hooked_term(model[0](x).detach(), eps=1e-6).item()
    with PCCLoss(model, ["0"], weight=1.0) as pcc:
        model(x)
        loss = pcc()
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        loss.backward()  # nothing it needs was overwritten by the in-place ReLU
    grad = model.get_parameter("0.weight").grad
    assert grad is not None and grad.abs().sum().item() > 0


def test_linear_layers_read_the_last_dim_as_channels() -> None:
    model = nn.Sequential(nn.Linear(5, 6))
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    with PCCLoss(model, ["0"], weight=1.0, eps=1e-12) as pcc:
        out = model.double()(x)  # (N, L, C)
        expected = ref_term(out.detach().transpose(1, 2).numpy(), "decorrelate")
        assert pcc().item() == pytest.approx(expected, rel=1e-9)
        out = model(x[:, 0])  # (N, C): the batch rows are the pixels
        assert pcc().item() == pytest.approx(
            ref_term(out.detach().T.numpy()[None], "decorrelate"), rel=1e-9
        )


def test_autocast_terms_are_computed_in_float32() -> None:
    model = small_cnn()
    x = torch.randn(4, 3, 8, 8)
    with PCCLoss(model, weight=1.0) as pcc:
        model(x)
        full = pcc().item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
            half = pcc()
        assert half.dtype == torch.float32 and half.item() == pytest.approx(full, abs=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda() -> None:
    model = small_cnn().cuda()
    with PCCLoss(model, weight=1.0) as pcc:
        model(torch.randn(4, 3, 8, 8, device="cuda"))
        loss = pcc()
        assert loss.device.type == "cuda"
        loss.backward()
    grad = model.get_parameter("0.weight").grad
    assert grad is not None and grad.abs().sum().item() > 0


# --------------------------------------------------------------------------- unhooking


def test_remove_unhooks_the_model() -> None:
    model = small_cnn()
    pcc = PCCLoss(model, weight=1.0)
    assert pcc.hooked and model._forward_pre_hooks and model[0]._forward_hooks
    model(torch.randn(2, 3, 8, 8))
    pcc.remove()
    pcc.remove()  # idempotent
    assert not pcc.hooked
    assert not model._forward_pre_hooks and not model[0]._forward_hooks
    assert not model[2]._forward_hooks
    model(torch.randn(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match="removed"):
        pcc()


def test_context_manager_unhooks_even_on_error() -> None:
    model = small_cnn()
    with pytest.raises(KeyError), PCCLoss(model) as pcc:
        raise KeyError("boom")
    assert not pcc.hooked and not model[0]._forward_hooks


# --------------------------------------------------------------------------- errors


def test_bad_layers_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"no layer named 'conv_layer.3'.*'conv_layers.3'"):
        PCCLoss(models.digit_cnn(), ["conv_layer.3"])
    model = small_cnn()
    with pytest.raises(ValueError, match="not a submodule"):
        PCCLoss(model, [nn.Conv2d(3, 3, 1)])
    with pytest.raises(ValueError, match="layers is empty"):
        PCCLoss(model, [])
    with pytest.raises(TypeError, match="layer names or modules"):
        PCCLoss(model, [0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no Conv1d/2d/3d"):
        PCCLoss(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        PCCLoss("model")  # type: ignore[arg-type]
    pcc = PCCLoss(model, "2")  # one name alone is one layer, not its characters
    assert pcc.layer_names == ("2",)
    assert PCCLoss(model, ["0", model[0], "2"]).layer_names == ("0", "2")  # no duplicates


@pytest.mark.parametrize("weight", [-1e-3, float("nan"), float("inf")])
def test_bad_weight(weight: float) -> None:
    with pytest.raises(ValueError, match="weight"):
        PCCLoss(small_cnn(), weight=weight)
    pcc = PCCLoss(small_cnn())
    with pytest.raises(ValueError, match="weight"):
        pcc.weight = weight
    with pytest.raises(TypeError, match="weight"):
        pcc.weight = True


def test_bad_mode_and_eps() -> None:
    with pytest.raises(ValueError, match=r"unknown PCC mode 'decorrelated'.*decorrelate"):
        PCCLoss(small_cnn(), mode="decorrelated")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        PCCLoss(small_cnn(), eps=-1.0)
    pcc = PCCLoss(small_cnn())
    with pytest.raises(ValueError, match="unknown PCC mode"):
        pcc.mode = "both"  # type: ignore[assignment]
    pcc.mode = "correlate"
    assert pcc.mode == "correlate"
    with pytest.raises(ValueError, match="eps"):
        pixel_correlation(torch.randn(2, 3, 4), eps=float("nan"))


def test_loss_before_any_forward_pass() -> None:
    with (
        PCCLoss(small_cnn()) as pcc,
        pytest.raises(RuntimeError, match="run the model on a batch"),
    ):
        pcc()


class Returns(nn.Module):
    def __init__(self, make: Callable[[torch.Tensor], object]) -> None:
        super().__init__()
        self.make = make

    def forward(self, x: torch.Tensor) -> object:
        return self.make(x)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda x: (x, x), TypeError, "returned a tuple, not a tensor"),
        (lambda x: x.flatten(), ValueError, "at least 2 dims"),
        (lambda x: x.long(), TypeError, "needs floats"),
        (lambda x: x[:, :1], ValueError, r"1 channel\(s\)"),
        (lambda x: x[:, :, :1, :1], ValueError, "at least 2 positions"),
        (lambda x: x[:1, :, 0, 0], ValueError, "drop_last=True"),
    ],
)
def test_unusable_outputs_raise_during_the_forward_pass(
    make: Callable[[torch.Tensor], object], error: type[Exception], match: str
) -> None:
    model = nn.Sequential(Returns(make))
    with PCCLoss(model, ["0"]), pytest.raises(error, match=rf"layer '0'.*{match}"):
        model(torch.randn(2, 3, 4, 4))


# --------------------------------------------------------------------------- real MNIST digits

TRAIN, HELD_OUT, EPOCHS, BATCH, LAMBDA = 2000, 1000, 2, 64, 1.0


def train_digit_cnn(
    x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, weight: float
) -> nn.Module:
    """digit_cnn, seeded: the same init and batch order whatever the weight."""
    torch.manual_seed(0)
    model = models.digit_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order_rng = torch.Generator().manual_seed(1)
    with PCCLoss(model, weight=weight, mode="decorrelate") as pcc:
        assert pcc.layer_names == ("conv_layers.0", "conv_layers.3", "conv_layers.6")
        for _ in range(EPOCHS):
            order = train[torch.randperm(len(train), generator=order_rng)]
            for batch in order.split(BATCH):
                loss = F.cross_entropy(model(x[batch]), y[batch]) + pcc()
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model.eval()


def held_out_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[float]]:
    """Accuracy and, per conv layer, the mean |r| over off-diagonal pairs and held-out digits."""
    maps: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: maps.__setitem__(name, out))
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    for handle in handles:
        handle.remove()
    mean_abs = []
    for fm in maps.values():
        r = pixel_correlation(fm)
        off = ~torch.eye(r.shape[1], dtype=torch.bool)
        mean_abs.append(r[:, off].abs().mean().item())
    return accuracy, mean_abs


@pytest.mark.real
@pytest.mark.slow
def test_pcc_training_decorrelates_real_digits(realdata: Path) -> None:
    """Trained with the PCC term, the MNIST CNN's channels correlate less on held-out digits."""
    start = time.perf_counter()
    x, y = load_mnist(realdata)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, held_out = perm[:TRAIN], perm[-HELD_OUT:]
    base_acc, base_r = held_out_stats(train_digit_cnn(x, y, train, 0.0), x[held_out], y[held_out])
    pcc_acc, pcc_r = held_out_stats(train_digit_cnn(x, y, train, LAMBDA), x[held_out], y[held_out])
    seconds = time.perf_counter() - start
    summary = (
        f"mean |r| per conv without PCC {np.round(base_r, 3)} (mean {np.mean(base_r):.3f}), "
        f"with PCC λ={LAMBDA} {np.round(pcc_r, 3)} (mean {np.mean(pcc_r):.3f}); held-out "
        f"accuracy {base_acc:.3f} without, {pcc_acc:.3f} with; {seconds:.1f} s"
    )
    print(summary)
    assert all(p < b for p, b in zip(pcc_r, base_r, strict=True)), summary
    assert np.mean(pcc_r) < 0.85 * np.mean(base_r), summary
    assert base_acc > 0.8 and pcc_acc > 0.8, summary  # chance is 0.1
    assert pcc_acc > base_acc - 0.05, summary
