"""Class-prior offsets and temperature (engines.builder.calibration) on data whose true
calibration is known."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.builder.calibration import (
    Calibration,
    calibrate,
    expected_calibration_error,
    softmax,
)


def sampled(
    rng: np.random.Generator, n: int, temperature: float, prior_shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a model that is off by `temperature` and `prior_shift`: the true class
    probabilities are softmax(true), the model reports true * temperature - prior_shift."""
    true = rng.normal(0, 2.0, size=(n, 3))
    targets = np.array([rng.choice(3, p=p) for p in softmax(true)])
    return true * temperature - prior_shift, targets


@settings(max_examples=15, deadline=None)
@given(
    temperature=st.floats(0.4, 2.5),
    shift=st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=2),
    seed=st.integers(0, 10_000),
)
def test_calibration_recovers_the_temperature_and_priors_it_was_given(
    temperature: float, shift: list[float], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    prior_shift = np.array([0.0, *shift])
    logits, targets = sampled(rng, 6000, temperature, prior_shift)
    found = calibrate([(logits, targets)], 3)
    assert found.temperature == pytest.approx(temperature, rel=0.12)
    np.testing.assert_allclose(
        np.array(found.offsets) / found.temperature, prior_shift / temperature, atol=0.15
    )
    fresh, fresh_targets = sampled(rng, 6000, temperature, prior_shift)
    before = expected_calibration_error(softmax(fresh), fresh_targets)
    after = expected_calibration_error(
        softmax((fresh + np.array(found.offsets)) / found.temperature), fresh_targets
    )
    assert after <= max(before, 0.03)
    assert after < 0.04


def test_folding_into_the_head_gives_the_calibrated_probabilities() -> None:
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(3, 8)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    calibration = Calibration(1.7, [0.0, 0.4, -0.3])
    folded_w, folded_b = calibration.fold(weight, bias)
    expected = softmax((x @ weight.T + bias + np.array(calibration.offsets)) / 1.7)
    np.testing.assert_allclose(softmax(x @ folded_w.T + folded_b), expected, atol=1e-5)


def test_each_domain_weighs_the_same_whatever_its_size() -> None:
    """A small domain that needs another correction still moves the fit as much as a big one."""
    rng = np.random.default_rng(2)
    big = sampled(rng, 8000, 1.0, np.array([0.0, 0.0, 0.0]))
    small = sampled(rng, 400, 1.0, np.array([0.0, 2.0, 0.0]))
    alone = calibrate([big], 3)
    both = calibrate([big, small], 3)
    assert abs(alone.offsets[1]) < 0.2
    assert both.offsets[1] > 0.5  # pooled, 400 of 8,400 texts would hardly move it


def test_no_validation_data_leaves_the_head_as_it_is() -> None:
    assert calibrate([(np.zeros((0, 3)), [])], 3) == Calibration(1.0, [0.0, 0.0, 0.0])
    assert expected_calibration_error(np.zeros((0, 3)), []) == 0.0
