"""Seconds and final objectives of ppvi's mixture and topic-model fitters next to the classic algorithms and
scikit-learn, on the same data (issue 5).

Mixtures (``gmm_rows``): the lecture's 2-D mixture (N = 1000, K = 2) and standardised iris (K = 3); ppvi SVI
(mean-field, assignments enumerated), ``models.gmm.cavi``, ``models.gmm.em``, scikit-learn's ``GaussianMixture``
and ``BayesianGaussianMixture``. Topic models (``lda_rows``): 20 Newsgroups (NVDM/ProdLDA bag of words, from the
shared data folder); ppvi LDA (mean-field Dirichlet guide), ppvi ProdLDA (amortized encoder) and scikit-learn's
``LatentDirichletAllocation``, all scored by one held-out perplexity estimator (document completion) and NPMI.

Usage::

    python benchmarks/gmm_lda_speed.py                       # both parts, K = 20 topics
    python benchmarks/gmm_lda_speed.py --part gmm
    python benchmarks/gmm_lda_speed.py --part lda --topics 50 --shared ../shared

BLAS and torch run single-threaded (``threadpoolctl``): on a busy 2-core machine multi-threaded BLAS made
scikit-learn 20x slower, and one thread is what every method gets.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from threadpoolctl import threadpool_limits

import ppvi  # noqa: E402
from ppvi.models import gmm  # noqa: E402

#: Convergence tolerance shared by EM, CAVI and scikit-learn: on the average log-likelihood per point (EM,
#: GaussianMixture) and on the total bound in nats (CAVI, BayesianGaussianMixture), scikit-learn's conventions.
GMM_TOLERANCE = 1e-6
GMM_MAX_ITERATIONS = 2000


def _mixture_log_likelihood(x: np.ndarray, weights, means, covariances) -> float:
    """Average log-likelihood per point of a mixture at point estimates, by SciPy (scikit-learn's ``score``)."""
    densities = [
        w * stats.multivariate_normal(m, c).pdf(x) for w, m, c in zip(weights, means, covariances, strict=True)
    ]
    return float(np.log(np.sum(densities, axis=0)).mean())


def gmm_rows(seed: int) -> list[dict]:
    """Seconds and final objectives of five mixture fitters. All start from the same k-means labelling
    (scikit-learn's ``init_params="kmeans"`` with ``random_state=seed``) except ppvi SVI (its Laplace start).

    ``loglik/pt``: average log-likelihood per point at the method's point estimate (EM's and sklearn's MLE; for
    CAVI and BayesianGaussianMixture ``E[pi]``, the means and ``(nu_k W_k)^-1``; for SVI the guide's posterior
    means over 1000 draws). ``ELBO/pt``: the evidence lower bound per point, all constants included
    (BayesianGaussianMixture's ``lower_bound_`` plus ``models.gmm.sklearn_lower_bound_offset``; SVI: mean of the
    last tenth of its per-step estimates). CAVI and sklearn's Bayesian mixture share the conjugate Normal-Wishart
    model with sklearn's default prior; SVI's model has different (non-conjugate) priors, so its ELBO bounds a
    different evidence.
    """
    from sklearn.mixture import BayesianGaussianMixture, GaussianMixture

    data_sets = {
        "lecture N=1000": (gmm.simulate_lecture_mixture(1000, seed=seed)[0], 2),
        "iris (standardised)": (gmm.iris()[0], 3),
    }
    rows = []
    for data_name, (x, K) in data_sets.items():
        points = x.numpy()
        N = len(points)

        def row(method, seconds, loglik, elbo, iterations, data_name=data_name):
            rows.append({"data": data_name, "method": method, "seconds": seconds, "loglik/pt": loglik,
                         "ELBO/pt": elbo, "iterations/steps": iterations})

        started = time.perf_counter()
        fit = ppvi.fit(gmm.model, x, K, guide="meanfield", seed=seed)
        seconds = time.perf_counter() - started
        weights, means, covariances = gmm.fit_components(fit.sample(1000, seed=seed))
        tail = max(1, len(fit.elbo) // 10)
        row("ppvi SVI (meanfield, enumerated z)", seconds,
            _mixture_log_likelihood(points, weights.mean(0).numpy(), means.mean(0).numpy(),
                                    covariances.mean(0).numpy()), float(fit.elbo[-tail:].mean()) / N, fit.steps)

        started = time.perf_counter()
        start = gmm.kmeans_responsibilities(points, K, seed)
        result = gmm.cavi(points, K, init=start, tolerance=GMM_TOLERANCE, max_iterations=GMM_MAX_ITERATIONS)
        seconds = time.perf_counter() - started
        row("ppvi.models.gmm.cavi", seconds,
            _mixture_log_likelihood(points, result.weights, result.means, result.covariances),
            result.elbo[-1] / N, result.iterations)

        started = time.perf_counter()
        start = gmm.kmeans_responsibilities(points, K, seed)
        result = gmm.em(points, K, init=start, tolerance=GMM_TOLERANCE, max_iterations=GMM_MAX_ITERATIONS)
        seconds = time.perf_counter() - started
        row("ppvi.models.gmm.em", seconds, result.log_likelihood[-1], math.nan, result.iterations)

        started = time.perf_counter()
        mixture = GaussianMixture(K, reg_covar=0.0, tol=GMM_TOLERANCE, max_iter=GMM_MAX_ITERATIONS,
                                  random_state=seed).fit(points)
        seconds = time.perf_counter() - started
        row("sklearn GaussianMixture", seconds, mixture.score(points), math.nan, mixture.n_iter_)

        started = time.perf_counter()
        bayesian = BayesianGaussianMixture(
            n_components=K, weight_concentration_prior_type="dirichlet_distribution", reg_covar=0.0,
            tol=GMM_TOLERANCE, max_iter=GMM_MAX_ITERATIONS, random_state=seed,
        ).fit(points)
        seconds = time.perf_counter() - started
        offset = gmm.sklearn_lower_bound_offset(N, gmm.default_prior(points, K), K)
        row("sklearn BayesianGaussianMixture", seconds,
            _mixture_log_likelihood(points, bayesian.weights_, bayesian.means_, bayesian.covariances_),
            (bayesian.lower_bound_ + offset) / N, bayesian.n_iter_)
    return rows


def lda_rows(corpus, num_topics: int, seed: int) -> list[dict]:
    """Seconds, held-out perplexity and NPMI of ppvi LDA, ppvi ProdLDA and scikit-learn's LatentDirichletAllocation
    fitted to ``corpus.train`` (a ``ppvi.data.Corpus``) with ``num_topics`` topics.

    Perplexity: document completion (Wallach et al. 2009) on the same 2,000 random test documents and the same
    token split for every method and seed (``models.lda.held_out_perplexity``, split seed 0). NPMI: mean over
    topics of the top-10-word NPMI from document co-occurrence in the training set (``models.lda.npmi_coherence``).
    Seconds: the fit only (evaluation excluded). scikit-learn's own ``perplexity()`` (its variational bound on all
    test documents) is reported beside it.
    """
    from sklearn.decomposition import LatentDirichletAllocation

    from ppvi.models import lda

    evaluated_documents = 2000  # ProdLDA's fold-in costs documents x topics x vocabulary per iteration

    def row(method: str, seconds: float, topic_word, combination: str, **extra) -> dict:
        perplexity = lda.held_out_perplexity(topic_word, corpus.test, combination, max_documents=evaluated_documents)
        npmi = float(lda.npmi_coherence(lda.top_words(topic_word), corpus.train).mean())
        return {"method": method, "num_topics": num_topics, "seed": seed, "seconds": seconds,
                "perplexity": perplexity, "npmi": npmi, **extra}

    ours = lda.fit_lda(corpus.train, num_topics, epochs=20, subsample_size=min(1000, corpus.train.shape[0]), seed=seed)
    product = lda.fit_prodlda(corpus.train, num_topics, epochs=50, learning_rate=0.002, seed=seed)
    started = time.perf_counter()
    sklearn = LatentDirichletAllocation(num_topics, learning_method="batch", random_state=seed).fit(corpus.train)
    sklearn_seconds = time.perf_counter() - started
    sklearn_topics = sklearn.components_ / sklearn.components_.sum(1, keepdims=True)
    return [
        row("ppvi LDA", ours.seconds, ours.topic_word, "mixture"),
        row("ppvi ProdLDA", product.seconds, product.topic_word, "product"),
        row("scikit-learn LDA", sklearn_seconds, sklearn_topics, "mixture",
            sklearn_own_perplexity=float(sklearn.perplexity(corpus.test))),
    ]


def shared_directory(argument: str | None) -> Path | None:
    candidate = argument or os.environ.get("PPVI_SHARED")
    path = Path(candidate) if candidate else Path(__file__).resolve().parents[2] / "shared"
    return path if path.is_dir() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["gmm", "lda", "both"], default="both")
    parser.add_argument("--topics", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", default=None, help="shared data folder (default: $PPVI_SHARED or ../shared)")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    pd.set_option("display.width", 200)
    with threadpool_limits(1):
        if arguments.part in ("gmm", "both"):
            print(pd.DataFrame(gmm_rows(arguments.seed)).to_string(index=False, float_format="%.4g"))
        if arguments.part in ("lda", "both"):
            shared = shared_directory(arguments.shared)
            if shared is None:
                print("LDA part skipped: the 20 Newsgroups data lives in the shared folder (--shared or $PPVI_SHARED)")
                return
            corpus = ppvi.data.corpus("20news", root=shared / "data" / "20news_nvdm_prodlda")
            print(pd.DataFrame(lda_rows(corpus, arguments.topics, arguments.seed)).to_string(
                index=False, float_format="%.4g"))


if __name__ == "__main__":
    main()
