"""The compute bar's *Calibrate*: simulated clicks, without a browser."""

import pytest

from tda_explorer.widgets import Explorer

pytestmark = pytest.mark.slow  # trains: the digits recipe retrained without a few groups


@pytest.fixture
def explorer(session_with):
    return Explorer(session_with("grad-dot"), k=4)


def test_calibrate_click_chooses_settings_computes_and_says_so(explorer):
    bar = explorer.compute_bar
    bar.choice.value = "if-ekfac"
    bar.calibrate_button.click()
    assert bar.run_button.disabled and bar.calibrate_button.disabled and not bar.cancel_button.disabled
    job = bar.job.join(300)
    assert job.state == "done", job.label
    result = explorer.session.calibrations["if-ekfac"]
    assert bar.calibration_ is result and result.truth == "retraining"  # a built-in recipe: retrained without groups
    assert "if-ekfac" in explorer.session.methods and "if-ekfac" in explorer.browser.method.options
    recipe = explorer.session.resources["recipe"]()["train_config"]  # a "use" of if-ekfac, filled by the session
    assert explorer.session.options["if-ekfac"] == {**result.options, "train_config": recipe}
    assert "calibrated: if-ekfac" in bar.message.value and "the default" in bar.message.value
    assert f"{result.default_score:.3f}" in bar.message.value
    assert bar.progress.bar_style == "success" and not bar.run_button.disabled and bar.cancel_button.disabled


def test_calibration_can_be_cancelled_and_its_errors_are_shown(explorer):
    bar = explorer.compute_bar
    bar.budget_s = 1e-3  # bad input: a budget too small to try one setting besides the default
    bar.choice.value = "if-kfac"
    job = bar.start_calibration("if-kfac").join(300)
    assert job.state == "failed" and "budget_s=0.001 s is too small" in bar.message.value
    assert not bar.calibrate_button.disabled and bar.progress.bar_style == "danger"
    bar.budget_s = None
    job = bar.start_calibration("if-kfac")
    bar.cancel_button.click()
    job.join(300)
    assert job.state == "cancelled" and "if-kfac" not in explorer.session.methods
    assert not bar.calibrate_button.disabled and not bar.run_button.disabled
