"""HTML views of ppvi's results (``ppvi.html`` and the ``_repr_html_`` methods): balanced markup, the key fields,
every text escaped, and no failure when the draws behind a summary fail."""

from __future__ import annotations

import html
from html.parser import HTMLParser

import pyro
import pyro.distributions as dist
import pytest
import torch

import ppvi
from ppvi.html import diagnosis_html, fit_html, sbc_html, vsbc_html
from ppvi.models import fake_gaussian

#: Elements without a closing tag.
VOID_TAGS = {"br", "hr", "img", "meta", "input", "col"}


class _BalanceChecker(HTMLParser):
    """Records tags left open or closed out of order."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def assert_well_formed(fragment: str) -> None:
    assert fragment.startswith("<div") and fragment.endswith("</div>")
    checker = _BalanceChecker()
    checker.feed(fragment)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert "<script" not in fragment.lower() and "<style" not in fragment.lower() and "<link" not in fragment.lower()


def _tiny(num_points):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", num_points):
        pyro.sample("y", dist.Normal(mu, 1.0))


@pytest.fixture
def laplace_fit() -> ppvi.Fit:
    return ppvi.fit(fake_gaussian.model, fake_gaussian.simulate(num_points=20).double(), guide="laplace")


def test_fit_html_shows_the_fields_and_the_summary(laplace_fit):
    fragment = laplace_fit._repr_html_()
    assert fragment == fit_html(laplace_fit)
    assert_well_formed(fragment)
    for text in ("laplace", laplace_fit.engine, "converged", "final ELBO", "message", "mu", "sd", "mean", "95%"):
        assert text in fragment
    assert "1000 draws, seed 0" in fragment


def test_fit_html_escapes_the_message_and_site_names(laplace_fit):
    laplace_fit.message = "stopped <script>alert('x')</script> & more"
    fragment = fit_html(laplace_fit)
    assert_well_formed(fragment)
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in fragment

    def angled():
        pyro.sample("a<b>", dist.Normal(0.0, 1.0))

    named = ppvi.fit(angled, guide="laplace")
    fragment = fit_html(named)
    assert_well_formed(fragment)
    assert "a&lt;b&gt;" in fragment and "<b>" not in fragment


def test_fit_html_shows_the_fields_when_the_draws_fail(laplace_fit, monkeypatch):
    def failing_summary(*args, **kwargs):
        raise RuntimeError("the guide <cannot> draw")

    monkeypatch.setattr(laplace_fit, "summary", failing_summary)
    fragment = laplace_fit._repr_html_()
    assert_well_formed(fragment)
    assert "laplace" in fragment and "No summary" in fragment and "the guide &lt;cannot&gt; draw" in fragment


def test_diagnosis_html_shows_verdict_khat_interval_ess_and_explanation(laplace_fit):
    diagnosis = laplace_fit.diagnose(num_samples=1000)
    fragment = diagnosis._repr_html_()
    assert fragment == diagnosis_html(diagnosis)
    assert_well_formed(fragment)
    low, high = diagnosis.khat_interval
    for text in (
        diagnosis.verdict, f"{diagnosis.khat:.2f}", f"[{low:.2f}, {high:.2f}]", "ESS",
        f"{diagnosis.effective_sample_size:.0f} of 1000",
    ):
        assert text in fragment
    assert html.escape(diagnosis.explanation) in fragment and "k-hat 0.18 &lt;= 0.5" in fragment


@pytest.fixture(scope="module")
def calibrations():
    """A small VSBC and SBC of a one-parameter model (each seeded by its own ``seed``; the global state is kept)."""
    vsbc = ppvi.vsbc(_tiny, 5, observed="y", num_simulations=20, steps=30)
    sbc = ppvi.sbc(_tiny, 5, observed="y", num_simulations=20, num_draws=9, steps=30)
    return vsbc, sbc


def test_vsbc_and_sbc_html_show_the_table_and_the_counts(calibrations):
    vsbc, sbc = calibrations
    fragment = vsbc_html(vsbc)
    assert_well_formed(fragment)
    table = vsbc.to_dataframe()
    assert "VSBC" in fragment and "ks_pvalue" in fragment and f"{table.loc['mu', 'ks_pvalue']:.4g}" in fragment
    assert f"{vsbc.num_converged} of 20" in fragment and "20 of 20" in fragment  # converged, Laplace starts
    assert f"1 {table.loc['mu', 'verdict']}" in fragment

    fragment = sbc_html(sbc)
    assert_well_formed(fragment)
    table = sbc.to_dataframe()
    assert "SBC" in fragment and "within_band" in fragment and f"1 {table.loc['mu', 'verdict']}" in fragment
    assert "guide draws per replication" in fragment and ">9<" in fragment


def test_calibration_results_render_through_repr_html(calibrations):
    vsbc, sbc = calibrations
    if not hasattr(vsbc, "_repr_html_"):
        pytest.skip("VSBCResult/SBCResult._repr_html_ not yet added to ppvi/calibration.py")
    assert vsbc._repr_html_() == vsbc_html(vsbc) and sbc._repr_html_() == sbc_html(sbc)


def test_compare_returns_a_dataframe_that_pandas_renders(laplace_fit):
    """Nothing for ppvi.html to do: compare's table is a DataFrame, which has its own _repr_html_."""
    table = ppvi.compare(fake_gaussian.model, guides={"laplace": laplace_fit}, num_samples=200)
    assert "<table" in table._repr_html_()


def test_nan_fields_read_n_a(laplace_fit):
    assert torch.isnan(torch.tensor(laplace_fit.final_elbo))  # a Laplace fit records no ELBO trace
    assert ">n/a<" in fit_html(laplace_fit)
