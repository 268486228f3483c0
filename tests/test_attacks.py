"""Attacks and audits on real and tiny models and on hand-built outcomes (core/privacy/attacks.py)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgemri.core.errors import EdgemriError
from edgemri.core.privacy.attacks import (
    AttackError,
    audit_guesses,
    best_match,
    calibrated_loss_attack,
    canary_coins,
    invert_gradients,
    linear_leakage,
    loss_threshold_attack,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    psnr,
    ssim,
)
from edgemri.models import build_model

# --- the analytic attack on the real student ---------------------------------------------------------------


def _student_head_gradient(label: int) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """The student, one 128 x 128 image, its true 3 x 32 x 32 feature map (flattened) and the image."""
    torch.manual_seed(0)
    model = build_model("student")
    image = torch.randn(1, 3, 128, 128)
    features = model.conv_block_2(model.conv_block_1(image)).flatten(1)[0].detach()
    loss = F.cross_entropy(model(image), torch.tensor([label]))
    loss.backward()
    return model, image, features, torch.tensor(label)


def test_the_head_gradient_gives_back_the_feature_map_and_the_label_exactly() -> None:
    model, _, features, label = _student_head_gradient(label=2)
    head = model.classifier[1]
    assert features.shape == (3 * 32 * 32,) and (features != 0).sum() > 100
    reconstruction, found = linear_leakage(head.weight.grad, head.bias.grad)
    assert torch.allclose(reconstruction, features, rtol=1e-5, atol=1e-7)
    assert found == 2


def test_a_one_step_sgd_update_leaks_the_same_and_dp_noise_destroys_it() -> None:
    model, image, features, _ = _student_head_gradient(label=3)
    before = copy.deepcopy(model)
    model.zero_grad()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    F.cross_entropy(model(image), torch.tensor([3])).backward()
    optimizer.step()
    d_weight = model.classifier[1].weight.detach() - before.classifier[1].weight.detach()
    d_bias = model.classifier[1].bias.detach() - before.classifier[1].bias.detach()
    reconstruction, found = linear_leakage(d_weight, d_bias, update=True)
    assert torch.allclose(reconstruction, features, rtol=1e-3, atol=1e-6)  # the step's rounding, not the attack
    assert found == 3
    assert linear_leakage(-d_weight, -d_bias)[1] == 3  # before - after is a multiple of the gradient

    # DP-SGD on one image: clip at C = the gradient's own norm (nothing clipped), add N(0, (sigma C)^2), sigma = 1.
    grad_w, grad_b = -d_weight / 0.05, -d_bias / 0.05
    clip = float(torch.sqrt(grad_w.square().sum() + grad_b.square().sum()))
    noise = torch.Generator().manual_seed(1)
    noisy_w = grad_w + clip * torch.randn(grad_w.shape, generator=noise)
    noisy_b = grad_b + clip * torch.randn(grad_b.shape, generator=noise)
    noisy, _ = linear_leakage(noisy_w, noisy_b)
    assert np.corrcoef(reconstruction.numpy(), features.numpy())[0, 1] > 0.999
    assert abs(np.corrcoef(noisy.numpy(), features.numpy())[0, 1]) < 0.1


def test_linear_leakage_refuses_bad_gradients() -> None:
    with pytest.raises(AttackError, match="classes, features"):
        linear_leakage(torch.zeros(4, 3), torch.zeros(5))
    with pytest.raises(AttackError, match="nonzero bias"):
        linear_leakage(torch.ones(4, 3), torch.zeros(4))
    with pytest.raises(AttackError, match="finite"):
        linear_leakage(torch.full((4, 3), math.nan), torch.ones(4))
    assert issubclass(AttackError, EdgemriError)


# --- gradient inversion on a tiny model ---------------------------------------------------------------------


def _tiny_conv_net() -> tuple[nn.Module, Tensor, dict[str, Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 64, 4))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    truth = torch.exp(-((xx - 0.2) ** 2 + (yy + 0.1) ** 2) / 0.3)[None, None]  # a blob in [0, 1]
    loss = F.cross_entropy(net(truth), torch.tensor([2]))
    names = [name for name, _ in net.named_parameters()]
    return net, truth, dict(zip(names, torch.autograd.grad(loss, list(net.parameters())), strict=True))


def test_gradient_inversion_gets_much_closer_than_its_start_and_is_deterministic() -> None:
    net, truth, grads = _tiny_conv_net()
    weights = copy.deepcopy(net.state_dict())
    kwargs = {"steps": 50, "lr": 0.1, "seed": 0, "tv_weight": 1e-2, "bounds": (0.0, 1.0)}
    reconstruction = invert_gradients(net, grads, (1, 1, 8, 8), None, **kwargs)  # label read off the head
    start = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(0, 1)  # its documented start
    start_psnr, end_psnr = psnr(start[0], truth[0], 1.0), psnr(reconstruction[0], truth[0], 1.0)
    assert end_psnr > start_psnr + 8.0, (start_psnr, end_psnr)
    assert ssim(reconstruction[0], truth[0], 1.0) > ssim(start[0], truth[0], 1.0) + 0.3
    assert torch.equal(reconstruction, invert_gradients(net, grads, (1, 1, 8, 8), 2, **kwargs))
    short = {**kwargs, "steps": 5}
    assert not torch.equal(invert_gradients(net, grads, (1, 1, 8, 8), 2, **short),
                           invert_gradients(net, grads, (1, 1, 8, 8), 2, **{**short, "seed": 1}))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None for p in net.parameters())


def test_gradient_inversion_refuses_bad_arguments() -> None:
    net, _, grads = _tiny_conv_net()
    with pytest.raises(AttackError, match="steps"):
        invert_gradients(net, grads, (1, 1, 8, 8), 2, steps=0)
    with pytest.raises(AttackError, match="steps"):
        invert_gradients(net, grads, (1, 1, 8, 8), 2, steps=10**9)
    with pytest.raises(AttackError, match="shape"):
        invert_gradients(net, grads, (2, 1, 8, 8), 2)
    with pytest.raises(AttackError, match="lr"):
        invert_gradients(net, grads, (1, 1, 8, 8), 2, lr=-1.0)
    with pytest.raises(AttackError, match="label"):
        invert_gradients(net, grads, (1, 1, 8, 8), 4, steps=1)
    with pytest.raises(AttackError, match="not a parameter"):
        invert_gradients(net, {"nope": torch.zeros(1)}, (1, 1, 8, 8), 2)
    with pytest.raises(AttackError, match="shape"):
        invert_gradients(net, {"3.bias": torch.zeros(5)}, (1, 1, 8, 8), 2)
    with pytest.raises(AttackError, match="3.weight"):
        invert_gradients(net, {"3.bias": grads["3.bias"]}, (1, 1, 8, 8), None)


# --- image similarity ----------------------------------------------------------------------------------------


def test_psnr_and_ssim_on_identical_and_hand_built_images() -> None:
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert psnr(image, image, 1.0) == math.inf
    assert ssim(image, image, 1.0) == pytest.approx(1.0, abs=1e-12)
    assert ssim(image[0], image[0], 1.0) == pytest.approx(1.0, abs=1e-12)  # single channel
    assert psnr(torch.zeros(4, 4), torch.full((4, 4), 0.1), 1.0) == pytest.approx(20.0)  # MSE 0.01
    assert psnr(torch.zeros(4, 4), torch.full((4, 4), 0.1), 2.0) == pytest.approx(20.0 + 20 * math.log10(2))
    # Constant images: no variance, so SSIM is the luminance term alone, whatever the window.
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * 0.5 * 0.25 + c1) / (0.5**2 + 0.25**2 + c1) * c2 / c2
    assert ssim(torch.full((12, 12), 0.5), torch.full((12, 12), 0.25), 1.0) == pytest.approx(expected)
    # A mean-preserving negative has the same luminance and contrast but opposite structure.
    assert ssim(image, 1 - image + (2 * image.mean() - 1), 1.0) < -0.5
    assert 0.0 < ssim(image, (image + torch.rand(3, 16, 16)) / 2, 1.0) < 0.9
    with pytest.raises(AttackError, match="one shape"):
        psnr(torch.zeros(2, 2), torch.zeros(3, 3), 1.0)
    with pytest.raises(AttackError, match="data_range"):
        ssim(image, image, 0.0)


def test_best_match_finds_the_candidate_a_reconstruction_came_from() -> None:
    candidates = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    noisy = candidates[3] + 0.05 * torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    index, match_psnr, match_ssim = best_match(noisy, candidates)
    assert index == 3
    assert match_psnr == pytest.approx(psnr(noisy, candidates[3], float(candidates.max() - candidates.min())))
    assert match_ssim > 0.8
    with pytest.raises(AttackError, match="candidates of shape"):
        best_match(noisy, candidates[:, 0])


# --- membership inference ------------------------------------------------------------------------------------


def _per_example_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def test_a_loss_attack_beats_chance_on_an_overfit_model_and_not_on_an_unseen_one() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 10, generator=generator)
    y = torch.randint(0, 4, (40,), generator=generator)  # random labels: only memorizing fits them
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 4))
    start = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(model(x[:20]), y[:20]).backward()
        optimizer.step()
    assert (model(x[:20]).argmax(1) == y[:20]).all()  # memorized
    members, nonmembers = _per_example_losses(model, x[:20], y[:20]), _per_example_losses(model, x[20:], y[20:])
    result = loss_threshold_attack(members, nonmembers)
    assert result["auc"] > 0.8 and result["members"] == 20 and result["nonmembers"] == 20
    calibrated = calibrated_loss_attack(members, nonmembers, _per_example_losses(start, x[:20], y[:20]),
                                        _per_example_losses(start, x[20:], y[20:]))
    assert calibrated["auc"] > 0.8

    # A model that saw neither set: the attack is at chance.
    many_x = torch.randn(1000, 10, generator=generator)
    many_y = torch.randint(0, 4, (1000,), generator=generator)
    unseen = _per_example_losses(start, many_x, many_y)
    assert abs(loss_threshold_attack(unseen[:500], unseen[500:])["auc"] - 0.5) < 0.1


def test_roc_auc_and_tpr_at_1pct_fpr_on_hand_built_scores_with_ties() -> None:
    # Scores are -loss. Members {3, 2, 2} vs non-members {2, 1}: 5 of 6 pairs won, the two ties count half.
    result = loss_threshold_attack([-3.0, -2.0, -2.0], [-2.0, -1.0])
    assert result["auc"] == pytest.approx(5 / 6)
    # 200 non-members scoring 0..199: 1% FPR allows two false positives, so threshold 198.
    nonmembers = np.arange(200.0)
    members = np.concatenate([np.full(30, 500.0), np.full(20, 198.5), np.full(50, -1.0)])
    assert loss_threshold_attack(-members, -nonmembers)["tpr_at_1pct_fpr"] == pytest.approx(0.5)
    # Ties: two non-members tie with five members at the top; taking the members takes both (2% FPR).
    nonmembers = np.concatenate([[50.0, 50.0], np.full(98, -5.0)])
    members = np.concatenate([np.full(5, 50.0), np.full(45, 10.0), np.full(50, -100.0)])
    tied = loss_threshold_attack(-members, -nonmembers)
    assert tied["tpr_at_1pct_fpr"] == 0.0
    assert loss_threshold_attack([0.0], [1.0]) == {"auc": 1.0, "tpr_at_1pct_fpr": 1.0, "members": 1, "nonmembers": 1}


def test_calibration_removes_what_example_difficulty_hides() -> None:
    difficulty = np.random.default_rng(0).exponential(3.0, size=400)  # some examples are hard for every model
    members, nonmembers = difficulty[:200] - 0.2, difficulty[200:]  # training lowers a member's loss by 0.2
    assert loss_threshold_attack(members, nonmembers)["auc"] < 0.6
    calibrated = calibrated_loss_attack(members, nonmembers, difficulty[:200], difficulty[200:])
    assert calibrated["auc"] == 1.0 and calibrated["tpr_at_1pct_fpr"] == 1.0
    with pytest.raises(AttackError, match="one reference loss per example"):
        calibrated_loss_attack(members, nonmembers, difficulty[:10], difficulty[200:])
    with pytest.raises(AttackError, match="finite"):
        loss_threshold_attack([math.nan], [1.0])


# --- the one-run audit ---------------------------------------------------------------------------------------


def test_all_right_guesses_give_a_bound_that_grows_with_the_guesses() -> None:
    bounds = [one_run_epsilon_lower_bound(r, r, 1000, delta=1e-5) for r in (5, 10, 100, 1000)]
    assert bounds[0] > 0 and bounds == sorted(bounds) and len(set(bounds)) == 4
    # delta = 0: P[all r right] = q^r <= beta, so epsilon = logit(beta^(1/r)).
    for r in (10, 100):
        q = 0.05 ** (1 / r)
        assert one_run_epsilon_lower_bound(r, r, 1000, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-9)
    assert one_run_epsilon_lower_bound(100, 100, 1000, delta=1e-5) < one_run_epsilon_lower_bound(100, 100, 1000, 0.0)
    assert one_run_epsilon_lower_bound(100, 100, 1000, 0.0, beta=0.01) < one_run_epsilon_lower_bound(
        100, 100, 1000, 0.0, beta=0.05)
    assert one_run_p_value(100, 100, 1000, 0.0, 0.0) == pytest.approx(0.5**100)


def test_guesses_at_chance_give_no_bound() -> None:
    assert one_run_epsilon_lower_bound(500, 1000, 1000, delta=1e-5) == 0.0
    assert one_run_epsilon_lower_bound(0, 0, 10, delta=1e-5) == 0.0
    coins = canary_coins(1000, seed=0)
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(5))  # knows nothing of the coins
    correct, guesses = audit_guesses(scores, coins, 100, 100)
    assert guesses == 200 and one_run_epsilon_lower_bound(correct, guesses, 1000, delta=1e-5) < 0.3


def test_the_bound_stays_below_the_true_epsilon_of_randomized_response() -> None:
    # Each canary's bit is released through epsilon-DP randomized response (kept with prob e^eps / (1 + e^eps)).
    epsilon, m = 1.0, 10_000
    coins = canary_coins(m, seed=0)
    flipped = torch.rand(m, generator=torch.Generator().manual_seed(1)) < 1 / (1 + math.exp(epsilon))
    released = coins ^ flipped
    ones = int(released.sum())
    correct, guesses = audit_guesses(released.float(), coins, ones, m - ones)
    assert guesses == m and correct == int((released == coins).sum())
    bound = one_run_epsilon_lower_bound(correct, guesses, m, delta=1e-5)
    assert 0.5 < bound <= epsilon + 1e-9


def test_audit_guesses_counts_the_top_and_bottom_and_refuses_bad_arguments() -> None:
    scores = torch.tensor([0.9, 0.1, 0.5, 0.8, 0.2])
    included = torch.tensor([True, False, False, False, True])
    # top 2 (0.9 yes, 0.8 no) and bottom 2 (0.1 excluded: right, 0.2 included: wrong)
    assert audit_guesses(scores, included, 2, 2) == (2, 4)
    assert audit_guesses(scores, included, 0, 0) == (0, 0)
    assert canary_coins(100, 3).equal(canary_coins(100, 3)) and 20 < int(canary_coins(100, 3).sum()) < 80
    with pytest.raises(AttackError, match="exceeds"):
        audit_guesses(scores, included, 3, 3)
    with pytest.raises(AttackError, match="bool"):
        audit_guesses(scores, included.int(), 1, 1)
    with pytest.raises(AttackError, match="correct <= guesses"):
        one_run_epsilon_lower_bound(5, 4, 10, 1e-5)
    with pytest.raises(AttackError, match="delta"):
        one_run_epsilon_lower_bound(4, 4, 10, 1.0)
    with pytest.raises(AttackError, match="beta"):
        one_run_epsilon_lower_bound(4, 4, 10, 0.0, beta=0.0)
