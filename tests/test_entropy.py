import math

import pytest
import torch

from dynmole.entropy import max_tsallis_entropy, shannon_entropy, tsallis_entropy, tsallis_entropy_above


def test_known_values():
    p = torch.tensor([0.5, 0.5])
    assert tsallis_entropy(p, q=2.0, normalize=False).item() == pytest.approx(0.5)  # 1 - 0.25 - 0.25
    assert shannon_entropy(p, normalize=False).item() == pytest.approx(math.log(2))
    p3 = torch.tensor([0.7, 0.2, 0.1])
    expected = (1 - (0.7**1.1 + 0.2**1.1 + 0.1**1.1)) / 0.1
    assert tsallis_entropy(p3, q=1.1, normalize=False).item() == pytest.approx(expected, rel=1e-5)


def test_tends_to_shannon():
    p = torch.softmax(torch.randn(5, 6, dtype=torch.float64), dim=-1)
    shannon = shannon_entropy(p, normalize=False)
    errors = [(tsallis_entropy(p, q=1 + d, normalize=False) - shannon).abs().max().item() for d in (1e-1, 1e-2, 1e-3)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2
    assert torch.equal(tsallis_entropy(p, q=1.0, normalize=False), shannon)


@pytest.mark.parametrize("q", [0.5, 1.0, 1.1, 2.0])
def test_normalised_range_and_extremes(q):
    n = 6
    uniform = torch.full((n,), 1 / n)
    one_hot = torch.zeros(n)
    one_hot[2] = 1
    assert tsallis_entropy(uniform, q=q).item() == pytest.approx(1.0, abs=1e-5)
    assert tsallis_entropy(one_hot, q=q).item() == pytest.approx(0.0, abs=1e-5)
    random = torch.softmax(torch.randn(100, n) * 3, dim=-1)
    values = tsallis_entropy(random, q=q)
    assert values.min() >= 0 and values.max() <= 1 + 1e-6
    assert tsallis_entropy(uniform, q=q, normalize=False).item() == pytest.approx(max_tsallis_entropy(n, q), rel=1e-5)


def test_gradient_finite_at_zero_probability():
    p = torch.tensor([1.0, 0.0, 0.0], requires_grad=True)
    for q in (1.0, 1.1):
        (grad,) = torch.autograd.grad(tsallis_entropy(p, q=q), p)
        assert torch.isfinite(grad).all()


def test_bad_q():
    with pytest.raises(ValueError, match="q must be > 0"):
        tsallis_entropy(torch.ones(3) / 3, q=0.0)


@pytest.mark.parametrize("q", [0.5, 1.0, 1.1, 2.0])
@pytest.mark.parametrize("n", [1, 2, 6])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_entropy_above_threshold_is_the_normalised_entropy_test(q, n, eps):
    """The threshold test on the unnormalised sum (DynMoLE eq. 17 as the router evaluates it) takes
    the decision of ``normalised entropy > threshold`` wherever the two roundings cannot straddle it."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(4000, n) * 2, dim=-1)
    entropy = tsallis_entropy(p, q=q, eps=eps)
    for threshold in (0.0, 0.3, 0.9, 1.0):
        above = tsallis_entropy_above(p, threshold, q=q, eps=eps)
        expected = entropy > threshold
        clear = (entropy - threshold).abs() > 1e-6
        assert above.dtype == torch.bool and above.shape == entropy.shape
        assert torch.equal(above[clear], expected[clear])
        if n > 1 and 0 < threshold < 1:
            assert expected.any() and (~expected).any()  # both decisions occur
