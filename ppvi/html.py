"""``ppvi.html``: small self-contained HTML views of ppvi's results, for Jupyter's rich display.

Each function returns one HTML fragment (a ``<div>`` holding tables; no CSS or JavaScript from outside), with
every piece of text escaped, so that a message or a site name cannot inject markup. The results' ``_repr_html_``
methods call them: :class:`ppvi.Fit`, :class:`ppvi.diagnostics.diagnosis.Diagnosis`, and the calibration results
:class:`ppvi.calibration.VSBCResult` and :class:`ppvi.calibration.SBCResult`. :func:`ppvi.compare` returns a
pandas DataFrame, which Jupyter already shows as a table.

The functions never raise for a result that exists: a part that cannot be computed (the draws behind a fit's
summary, say) is replaced by a line saying why.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from ppvi.calibration import SBCResult, VSBCResult
    from ppvi.diagnostics.diagnosis import Diagnosis
    from ppvi.result import Fit

__all__ = ["SUMMARY_DRAWS", "SUMMARY_ROWS", "diagnosis_html", "fit_html", "sbc_html", "vsbc_html"]

#: Draws behind the summary table of a fit's HTML view (seed 0): enough for two significant digits of the means
#: and sds, few enough that a notebook cell shows the fit at once.
SUMMARY_DRAWS = 1000
#: Rows of a table shown before the rest is elided (a VAE has thousands of components).
SUMMARY_ROWS = 30

#: Inline style of the tables: compact, left-aligned labels; nothing that needs a stylesheet.
_TABLE_STYLE = "border-collapse: collapse; text-align: left;"
_LABEL_STYLE = "padding: 1px 12px 1px 0; font-weight: bold; vertical-align: top;"
_CELL_STYLE = "padding: 1px 12px 1px 0; vertical-align: top;"


def _text(value: Any) -> str:
    """A value as escaped text: floats with four significant digits, NaN as ``n/a``."""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return html.escape(f"{value:.4g}")
    return html.escape(str(value))


def _fields(rows: Iterable[tuple[str, Any]]) -> str:
    """A two-column table of labelled fields, labels and values escaped."""
    body = "".join(
        f'<tr><th style="{_LABEL_STYLE}">{html.escape(label)}</th><td style="{_CELL_STYLE}">{_text(value)}</td></tr>'
        for label, value in rows
    )
    return f'<table style="{_TABLE_STYLE}">{body}</table>'


def _paragraph(text: str) -> str:
    return f'<p style="margin: 4px 0; white-space: pre-wrap;">{html.escape(text)}</p>'


def _title(text: str) -> str:
    return f'<p style="margin: 4px 0; font-weight: bold;">{html.escape(text)}</p>'


def _dataframe(table: pd.DataFrame, max_rows: int = SUMMARY_ROWS) -> str:
    """A DataFrame as an escaped HTML table, numbers to four significant digits, long tables elided."""
    shown = table.head(max_rows)
    rendered = shown.to_html(escape=True, float_format=lambda x: f"{x:.4g}", border=0, na_rep="n/a")
    if len(table) > max_rows:
        rendered += _paragraph(f"... {len(table) - max_rows} more rows of {len(table)}")
    return rendered


def _wrap(kind: str, parts: Iterable[str]) -> str:
    return f'<div class="ppvi-{kind}">' + "".join(parts) + "</div>"


def fit_html(fit: Fit, num_samples: int = SUMMARY_DRAWS, seed: int = 0) -> str:
    """HTML view of a fit: its guide, training engine, convergence, steps, time, final ELBO and message, and the
    posterior summary of ``num_samples`` draws (seed ``seed``).

    Parameters
    ----------
    fit : ppvi.Fit
        The fit to show.
    num_samples : int
        Draws behind the summary table.
    seed : int
        Seed of those draws (the global random state is left as it was).

    Returns
    -------
    str
        An HTML fragment. When the draws fail, the fields are shown with a line saying why instead of the table.
    """
    name = fit.guide_name or type(fit.guide).__name__
    rows: list[tuple[str, Any]] = [
        ("guide", name),
        ("engine", getattr(fit, "engine", "n/a")),
        ("converged", fit.converged),
        ("steps", fit.steps),
        ("seconds", float(fit.seconds)),
        ("final ELBO", fit.final_elbo),
        ("device", fit.device),
        ("message", fit.message),
    ]
    if fit.laplace_failure is not None:
        rows.append(("Laplace start", f"failed: {fit.laplace_failure}"))
    if fit.interrupted:
        rows.append(("interrupted", True))
    parts = [_title("ppvi.Fit"), _fields(rows)]
    try:
        summary = fit.summary(num_samples, seed=seed)
    except Exception as error:  # a view must not fail: say why there is no table
        parts.append(_paragraph(f"No summary: drawing from the guide failed ({type(error).__name__}: {error})."))
    else:
        parts.append(_title(f"Posterior summary of the guide ({num_samples} draws, seed {seed})"))
        parts.append(_dataframe(summary))
    return _wrap("fit", parts)


def diagnosis_html(diagnosis: Diagnosis) -> str:
    """HTML view of a PSIS diagnosis: verdict, k-hat with its bootstrap interval and threshold, ESS, the size of
    the mismatch, the ELBO and the explanation.

    Parameters
    ----------
    diagnosis : Diagnosis
        What :meth:`ppvi.Fit.diagnose` returns.

    Returns
    -------
    str
        An HTML fragment.
    """
    low, high = diagnosis.khat_interval
    interval = f"[{low:.2f}, {high:.2f}]" if math.isfinite(low) and math.isfinite(high) else "n/a"
    rows: list[tuple[str, Any]] = [
        ("verdict", diagnosis.verdict),
        ("k-hat", f"{diagnosis.khat:.2f}"),
        ("k-hat 90 % bootstrap interval", interval),
        ("threshold", f"{diagnosis.threshold:.2f}"),
        ("ESS", f"{diagnosis.effective_sample_size:.0f} of {diagnosis.num_samples}"),
        ("log-weight sd", float(diagnosis.log_weight_sd)),
        ("largest mean shift (guide sds)", float(diagnosis.mean_shift)),
        ("largest relative sd change", float(diagnosis.sd_change)),
        ("ELBO (these draws)", float(diagnosis.elbo)),
    ]
    return _wrap("diagnosis", [_title("PSIS diagnosis"), _fields(rows), _paragraph(diagnosis.explanation)])


def _calibration_fields(result: VSBCResult | SBCResult) -> list[tuple[str, Any]]:
    rows = [
        ("guide", result.guide),
        ("replications", result.num_simulations),
        ("converged", f"{result.num_converged} of {result.num_simulations}"),
        ("Laplace starts", f"{int(result.laplace_succeeded.sum())} of {result.num_simulations}"),
        ("seconds", float(result.seconds)),
        ("engine", result.engine + (f" ({result.engine_reason})" if result.engine_reason else "")),
    ]
    shards = getattr(result, "shards", None)
    if shards is not None and len(shards) and set(shards["worker"]) != {"local"}:
        rows.append(("Dask shards", f"{len(shards)} on {shards['worker'].nunique()} workers"))
    return rows


def _verdict_counts(table: pd.DataFrame) -> str:
    """``"3 symmetric, 1 asymmetric (q too low)"``: how many components have each verdict."""
    if "verdict" not in table or not len(table):
        return "no components"
    return ", ".join(f"{count} {verdict}" for verdict, count in table["verdict"].value_counts().items())


def vsbc_html(result: VSBCResult) -> str:
    """HTML view of a VSBC result: the replications and their fits, and per component the KS test of the symmetry
    of ``p`` (:meth:`ppvi.calibration.VSBCResult.to_dataframe`) with the count of each verdict.

    Parameters
    ----------
    result : VSBCResult
        What :func:`ppvi.vsbc` returns.

    Returns
    -------
    str
        An HTML fragment.
    """
    table = result.to_dataframe()
    rows = [*_calibration_fields(result), ("KS level", float(result.alpha)), ("verdicts", _verdict_counts(table))]
    return _wrap("vsbc", [_title("VSBC (Yao et al. 2018)"), _fields(rows), _dataframe(table)])


def sbc_html(result: SBCResult) -> str:
    """HTML view of an SBC result: the replications and their fits, and per component the rank statistics and
    verdict (:meth:`ppvi.calibration.SBCResult.to_dataframe`) with the count of each verdict.

    Parameters
    ----------
    result : SBCResult
        What :func:`ppvi.sbc` returns.

    Returns
    -------
    str
        An HTML fragment.
    """
    table = result.to_dataframe()
    rows = [
        *_calibration_fields(result),
        ("guide draws per replication", result.num_draws),
        ("verdicts", _verdict_counts(table)),
    ]
    return _wrap("sbc", [_title("SBC"), _fields(rows), _dataframe(table)])
