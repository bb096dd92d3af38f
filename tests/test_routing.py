import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from dynmole import routing
from dynmole.entropy import tsallis_entropy


def _logits(n=6, tokens=500, scale=2.0, seed=0):
    torch.manual_seed(seed)
    return torch.randn(tokens, n) * scale


def test_soft_on_simplex():
    g = routing.soft(_logits())
    assert (g >= 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[0]))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k(k):
    logits = _logits()
    g = routing.top_k(logits, k)
    assert ((g > 0).sum(-1) == k).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[0]))
    # the kept experts are the k largest logits, zeros exactly elsewhere
    expected = torch.zeros_like(g, dtype=torch.bool).scatter(-1, logits.topk(k, -1).indices, True)
    assert torch.equal(g > 0, expected)
    assert (g[~expected] == 0).all()


def test_top_k_bad_k():
    with pytest.raises(ValueError, match="1 <= k <= num_experts"):
        routing.top_k(_logits(n=4), 5)


@pytest.mark.parametrize("p", [0.3, 0.75, 0.95, 1.0])
def test_top_p_paper_is_smallest_prefix_reaching_p(p):
    logits = _logits()
    probs = torch.softmax(logits, -1)
    g = routing.top_p(logits, p)
    kept = g > 0
    mass = (probs * kept).sum(-1)
    assert (mass >= p - 1e-6).all()
    # removing the smallest kept expert drops below p: the prefix is minimal
    smallest_kept = torch.where(kept, probs, torch.inf).amin(-1)
    assert ((mass - smallest_kept) < p + 1e-6).all()
    torch.testing.assert_close(g, probs * kept)  # not renormalised


def test_top_p_reference_drops_the_crossing_expert():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert torch.equal(routing.top_p(logits, 0.7, mode="paper") > 0, torch.tensor([[True, True, False]]))
    assert torch.equal(routing.top_p(logits, 0.7, mode="reference") > 0, torch.tensor([[True, False, False]]))
    # the reference rule alone would keep nothing here; top-1 is always kept
    assert torch.equal(routing.top_p(logits, 0.4, mode="reference") > 0, torch.tensor([[True, False, False]]))


def test_top_p_validation():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        routing.top_p(_logits(), 1.5)


@pytest.mark.parametrize("keep_top_k", [1, 2, 3])
@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_dynamic_invariants(keep_top_k, threshold):
    logits = _logits(scale=1.5)
    probs = torch.softmax(logits, -1)
    gates, soft = routing.dynamic_route(logits, q=1.1, threshold=threshold, top_p=0.75, keep_top_k=keep_top_k)
    assert (gates >= 0).all()
    entropy = tsallis_entropy(probs, q=1.1)
    assert torch.equal(soft, entropy > threshold)
    assert soft.any() and (~soft).any()  # both branches exercised
    # soft branch: every expert, g = p
    torch.testing.assert_close(gates[soft], probs[soft])
    # sparse branch: at least keep_top_k experts, the top-p set included, zeros exactly elsewhere
    sparse = gates[~soft]
    assert ((sparse > 0).sum(-1) >= keep_top_k).all()
    top_p_set = routing.top_p_mask(probs[~soft], 0.75)
    assert ((sparse > 0) | ~top_p_set).all()
    kept = sparse > 0
    torch.testing.assert_close(sparse, probs[~soft] * kept)


def test_dynamic_without_soft_branch_and_renormalised():
    logits = _logits()
    gates, soft = routing.dynamic_route(logits, threshold=None, keep_top_k=1, renormalize=True)
    assert not soft.any()
    torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[0]))
    assert ((gates > 0).sum(-1) < 6).any()


def test_dynamic_all_soft_when_uniform():
    gates = routing.dynamic(torch.zeros(4, 6))
    assert (gates > 0).all()


def _qp_sparsegen(u: np.ndarray, lam: float) -> np.ndarray:
    n = len(u)
    result = minimize(
        lambda g: np.sum((g - u) ** 2) - lam * np.sum(g**2),
        np.full(n, 1 / n),
        jac=lambda g: 2 * (g - u) - 2 * lam * g,
        constraints=[{"type": "eq", "fun": lambda g: g.sum() - 1, "jac": lambda g: np.ones(n)}],
        bounds=[(0, None)] * n,
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert result.success
    return result.x


@pytest.mark.parametrize("lam", [-2.0, -0.5, 0.0, 0.5, 0.9])
def test_sparsegen_matches_qp(lam):
    torch.manual_seed(1)
    for _ in range(5):
        u = torch.randn(6, dtype=torch.float64)
        g = routing.sparsegen(u, torch.tensor([lam], dtype=torch.float64))
        np.testing.assert_allclose(g.numpy(), _qp_sparsegen(u.numpy(), lam), atol=1e-5)


def test_sparsegen_on_simplex_with_token_lambda():
    logits = _logits()
    lam = torch.rand(logits.shape[0], 1) * 1.4 - 0.5  # in [-0.5, 0.9)
    g = routing.sparsegen(logits, lam)
    assert (g >= 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[0]))
    assert ((g > 0).sum(-1) >= 1).all()
    # larger lambda -> sparser on average
    dense = routing.sparsegen(logits, torch.full_like(lam, -2.0))
    sparse = routing.sparsegen(logits, torch.full_like(lam, 0.9))
    assert (sparse > 0).sum() < (dense > 0).sum()


def test_sparsegen_gradient_matches_finite_differences():
    torch.manual_seed(3)
    u = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    lam = (torch.rand(3, 1, dtype=torch.float64) * 0.8).requires_grad_()
    weights = torch.randn(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: (routing.sparsegen(a, b) * weights).sum(), (u, lam),
                                    eps=1e-6, atol=1e-5)


def test_sparsity_lower_bound_keeps_at_most_k():
    logits = _logits(tokens=200)
    for k in (1, 2, 3):
        lower = routing.sparsity_lower_bound(logits, k)
        active = (routing.sparsegen(logits, lower + 1e-4) > 0).sum(-1)
        assert (active <= k).all()
        more = (routing.sparsegen(logits, lower - 1e-2) > 0).sum(-1)
        assert (more > k).any()


def test_lambda_mlp_below_one():
    mlp = routing.LambdaMLP(8, hidden=4)
    lam = mlp(torch.randn(10, 8) * 100)
    assert lam.shape == (10, 1) and (lam < 1).all()


def test_relu_gates_and_l1_coefficient():
    logits = _logits()
    g = routing.relu(logits)
    assert (g >= 0).all() and torch.equal(g > 0, logits > 0)
    coef = torch.tensor(1.0)
    assert routing.update_l1_coefficient(coef, torch.tensor(3.0), 2.0, 1.2).item() == pytest.approx(1.2)
    assert routing.update_l1_coefficient(coef, torch.tensor(1.0), 2.0, 1.2).item() == pytest.approx(1 / 1.2)


def test_hybrid_ties_take_one_sort_order():
    # exactly tied probabilities: the reference code takes the top-p set and the keep-top-k
    # floor from one sort, so the union is a prefix of max(k, |top-p set|) experts
    logits = torch.tensor([[1.0, 1, 1, 1, 0, 0]])
    kept = routing.dynamic(logits, threshold=None, top_p=0.75, keep_top_k=2, top_p_mode="reference") > 0
    assert kept.sum().item() == 3
    kept = routing.dynamic(logits, threshold=None, top_p=0.75, keep_top_k=2, top_p_mode="paper") > 0
    assert kept.sum().item() == 4
    # many ties: the sparse branch keeps exactly max(keep_top_k, |top-p set|) experts
    torch.manual_seed(0)
    tied = torch.randint(0, 3, (400, 6)).float()
    probs = torch.softmax(tied, -1)
    for mode in ("paper", "reference"):
        for k in (1, 2, 3):
            gates, _ = routing.dynamic_route(tied, threshold=None, top_p=0.6, keep_top_k=k, top_p_mode=mode)
            expected = routing.top_p_mask(probs, 0.6, mode).sum(-1).clamp_min(k)
            assert torch.equal((gates > 0).sum(-1), expected), (mode, k)


def test_top_p_floor_ties_take_one_sort_order():
    # the reference rule keeps the first sorted expert alone; the top-1 floor must not add another tied one
    logits = torch.tensor([[1.0, 1, 1, 1, 0, 0]])
    kept = routing.top_p(logits, 0.3, mode="reference") > 0
    assert kept.sum().item() == 1
    torch.manual_seed(1)
    tied = torch.randint(0, 2, (400, 6)).float()
    expected = routing.top_p_mask(torch.softmax(tied, -1), 0.3, "reference").sum(-1).clamp_min(1)
    assert torch.equal((routing.top_p(tied, 0.3, mode="reference") > 0).sum(-1), expected)


def test_threshold_one_is_never_soft():
    uniform = torch.zeros(4, 6)  # normalised entropy 1 (+ rounding: 1 + 1.2e-7) with eps = 0
    for eps in ({}, {"eps": 0.0}, {"eps": 1e-5}):
        gates, soft = routing.dynamic_route(uniform, threshold=1.0, top_p=0.5, keep_top_k=2, **eps)
        assert not soft.any()
        assert ((gates > 0).sum(-1) == 3).all()


def test_entropy_eps_is_the_reference_default_and_moves_the_decision():
    import inspect

    from dynmole import MoLEConfig
    from dynmole.gating import build_gate_fn

    assert inspect.signature(routing.DynamicRouter).parameters["eps"].default == 1e-5
    assert MoLEConfig().entropy_eps == 1e-5
    # near-uniform routers sit right at the threshold: eps = 1e-5 lowers their entropy below it
    torch.manual_seed(0)
    logits = torch.randn(2000, 6) * 0.05
    probs = torch.softmax(logits, -1)
    plain = tsallis_entropy(probs, q=1.1)
    with_eps = tsallis_entropy(probs, q=1.1, eps=1e-5)
    threshold = float(plain.median())
    _, soft_ref = routing.dynamic_route(logits, threshold=threshold, eps=1e-5)
    _, soft_paper = routing.dynamic_route(logits, threshold=threshold, eps=0.0)
    assert torch.equal(soft_ref, with_eps > threshold) and torch.equal(soft_paper, plain > threshold)
    assert (soft_ref != soft_paper).any()
    # the config's eps reaches the gate function
    config = MoLEConfig(threshold=threshold)
    route = build_gate_fn(config, 6)(logits, None)
    assert torch.equal(route.soft_branch, soft_ref)
    route = build_gate_fn(MoLEConfig(threshold=threshold, entropy_eps=0.0), 6)(logits, None)
    assert torch.equal(route.soft_branch, soft_paper)


def test_lambda_mlp_reference_bias_init():
    mlp = routing.LambdaMLP(8, hidden=4, bias_init=-2.5)
    assert (mlp.fc1.bias == -2.5).all() and (mlp.fc2.bias == -2.5).all()
    lam = mlp(torch.randn(100, 8) * 0.1)
    # logsigmoid(-2.5) + 0.99 = -1.59: the reference starts dense
    torch.testing.assert_close(lam.mean(), torch.tensor(-1.59), atol=0.05, rtol=0)
