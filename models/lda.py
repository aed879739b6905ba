"""Topic models: latent Dirichlet allocation and ProdLDA, with the topic assignments marginalised, and their
evaluation (held-out perplexity, NPMI coherence, top words, topic matching).

**LDA** (Blei, Ng & Jordan 2003). For topics ``k = 1..K`` over a vocabulary of ``V`` words and documents
``d = 1..D``,

.. math::

    \\beta_k \\sim \\mathrm{Dirichlet}(\\eta 1_V), \\quad \\theta_d \\sim \\mathrm{Dirichlet}(\\alpha 1_K), \\quad
    w_d \\mid \\theta_d, \\beta \\sim \\mathrm{Multinomial}(N_d, \\theta_d^\\top \\beta),

the per-word topic assignments summed out (a document's words are a draw from the *mixture* of its topics).
Latent sites: ``topics`` (``K x V``, plate ``topic``) and ``topic_proportions`` (``D x K``, plate
``documents``); observed site ``words`` (``D x V`` counts). Text is sparse (98 % of AP's document x word cells are
zero), so training works on the nonzero entries only (:class:`SparseCounts`): the likelihood is
``sum_{n_dw > 0} n_dw log(theta_d . beta_w)`` plus the multinomial coefficient, the dense model's value exactly,
at ``nnz x K`` instead of ``D x V x K`` per step, with minibatches of documents where they pay (stochastic
variational inference, Hoffman, Blei, Wang & Paisley 2013). :class:`MeanFieldDirichletGuide` is the mean-field
family of the paper, ``q(beta_k) = Dirichlet(lambda_k)``, ``q(theta_d) = Dirichlet(gamma_d)``, trained by
stochastic gradients (implicit reparameterisation of the Dirichlet, Figurnov, Mohamed & Mnih 2018) with the KL
terms in closed form (``TraceMeanField_ELBO``).

**ProdLDA** (Srivastava & Sutton 2017, "Autoencoding variational inference for topic models"). The words of a
document come from a *product of experts*, ``w_d ~ Multinomial(N_d, softmax(theta_d^T B))``, with unnormalised
topics ``B`` (``K x V``, a point estimate, with the paper's batch normalisation and dropout) and a
logistic-normal ``theta_d = softmax(z_d)``, ``z_d ~ N(mu_0, diag(sigma_0^2))`` whose ``mu_0, sigma_0`` are the
paper's Laplace approximation to ``Dirichlet(alpha)`` in the softmax basis (:func:`laplace_dirichlet_prior`).
Latent site ``topic_logits`` (``D x K``); :class:`ProdLDA` is both the amortized encoder guide ``q(z_d | w_d)``
(the paper's two softplus layers) and the owner of the decoder, so ``ppvi.fit(prodlda.model, counts,
guide=prodlda, subsample_size=...)`` trains both.

**Evaluation.** One estimator of held-out perplexity serves every model, ours and scikit-learn's
(:func:`held_out_perplexity`): *document completion* (Wallach, Murray, Salakhutdinov & Mimno 2009, "Evaluation
methods for topic models", §4): each held-out document's tokens are split at random in two halves; its topic
proportions are fitted to the first half by maximum likelihood with the topics fixed (:func:`fold_in`), and the
perplexity ``exp(-sum log p(second halves) / number of tokens in them)`` is taken over the second halves. Topic
coherence is NPMI (Bouma 2009; Lau, Newman & Baldwin 2014) over each topic's top words, with probabilities from
document co-occurrence in a reference corpus (:func:`npmi_coherence`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from typing import Literal

import numpy as np
import pyro
import pyro.distributions as dist
import scipy.optimize
import scipy.sparse
import scipy.special
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional

Combination = Literal["mixture", "product"]

#: Defaults of :func:`simulate` and :func:`model` when it simulates: small enough for a test, large enough that
#: the topics are identifiable (about 20,000 tokens for 5 x 50 topic-word probabilities).
DEFAULT_NUM_TOPICS = 5
DEFAULT_VOCABULARY_SIZE = 50
DEFAULT_NUM_DOCUMENTS = 200
DEFAULT_DOCUMENT_LENGTH = 100
#: Default topic-word concentration ``eta``: sparse topics, each putting most mass on a few words.
DEFAULT_TOPIC_CONCENTRATION = 0.1
#: Hidden width of the ProdLDA encoder and its dropout rate (Srivastava & Sutton 2017, §5: two layers of 100
#: softplus units, dropout 0.2 on the encoder output and on theta).
DEFAULT_HIDDEN_SIZE = 100
DEFAULT_DROPOUT = 0.2
#: Adam's learning rate of :func:`fit_lda` on the guide's log-concentrations. They must grow from about 1 to the
#: token counts they summarise (thousands), at most about ``learning_rate`` per step in log space; 0.3 does it in
#: tens of steps. Measured: held-out perplexity on AP (1,800 documents, K=10, full batches) 3,362 after 100 steps at
#: 0.05 and 3,243 at 0.3 (scikit-learn's batch LDA: 3,317); mean total variation to the true topics of the
#: 300-document test corpus 0.071 after 200 steps at 0.05 and 0.041 at 0.3.
DEFAULT_LDA_LEARNING_RATE = 0.3
#: Top words per topic for coherence, as in Lau, Newman & Baldwin (2014) and the ProdLDA paper.
DEFAULT_TOP_WORDS = 10


def _as_counts(counts: np.ndarray | torch.Tensor | scipy.sparse.spmatrix, name: str = "counts") -> np.ndarray:
    """Dense float64 numpy copy of a documents-by-vocabulary count matrix, checked."""
    if scipy.sparse.issparse(counts):
        array = counts.toarray()
    elif isinstance(counts, torch.Tensor):
        array = counts.detach().cpu().numpy()
    else:
        array = np.asarray(counts)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (documents x vocabulary) count matrix, got shape {array.shape}")
    array = array.astype(np.float64)
    _refuse_non_counts(array, name)
    return array


def _refuse_non_counts(array: np.ndarray, name: str) -> None:
    """Raise, naming the first bad entry and the fix, unless ``array`` holds non-negative whole numbers."""
    bad = ~np.isfinite(array) | (array < 0) | (array != np.round(array))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        value = float(array[where])
        kind = "fractional" if np.isfinite(value) and value >= 0 else ("negative" if value < 0 else "non-finite")
        raise ValueError(
            f"{name} must hold non-negative integer word counts, but entry {list(where)} is {kind} ({value!r}; "
            f"{int(bad.sum())} such entries): topic models count words, and fractional counts would be scored as "
            "if they were whole. Pass the raw counts (round them, np.rint(counts), only if they are counts that "
            "picked up round-off), not normalised or weighted ones (tf-idf)"
        )


#: Observed count tensors already checked by :func:`_check_count_tensor`, by identity and version (a tensor
#: changed in place is checked again): the models run every step, and the check of a large corpus is not free.
_CHECKED_COUNTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _check_count_tensor(counts: torch.Tensor, name: str = "counts") -> None:
    """The models' check of their observed counts, once per tensor (see :data:`_CHECKED_COUNTS`)."""
    key = (id(counts), counts._version)
    if _CHECKED_COUNTS.get(key) is counts:
        return
    if counts.is_floating_point() or (counts.dtype != torch.bool and bool((counts < 0).any())):
        _refuse_non_counts(counts.detach().cpu().double().numpy(), name)
    _CHECKED_COUNTS[key] = counts


def _as_sparse(
    counts: np.ndarray | torch.Tensor | scipy.sparse.spmatrix, name: str = "counts"
) -> scipy.sparse.csr_matrix:
    """CSR float64 copy of a count matrix, checked (sparse input stays sparse, without densifying)."""
    if scipy.sparse.issparse(counts):
        matrix = scipy.sparse.csr_matrix(counts, dtype=np.float64)
        if matrix.ndim != 2:
            raise ValueError(f"{name} must be 2-d (documents x vocabulary), got shape {matrix.shape}")
        data = matrix.data
        if not np.isfinite(data).all() or (data < 0).any() or (data != np.round(data)).any():
            raise ValueError(f"{name} must hold non-negative integer word counts")
        matrix.eliminate_zeros()
        return matrix
    return scipy.sparse.csr_matrix(_as_counts(counts, name))


# --- sparse counts --------------------------------------------------------------------------------------------


class SparseCounts:
    """A documents-by-vocabulary count matrix kept as its nonzero entries, the form the LDA model trains on.

    Text is sparse (98 % of the AP corpus' document x word cells are zero), so the likelihood is computed per
    nonzero ``(document, word)`` entry: ``sum_{(d, w): n_dw > 0} n_dw log(theta_d . beta_w)``, which costs
    ``nnz x K`` instead of ``D x V x K``. Pass one to :func:`model` (or let :func:`fit_lda` build it): ``ppvi.fit``
    hands it to the model unchanged, and the model places its tensors on the fit's device and dtype once.

    Parameters
    ----------
    counts : array-like, torch.Tensor or scipy.sparse matrix
        Non-negative integer counts ``(D, V)``; dense input is converted once, sparse input is never densified.
    dtype : torch.dtype, optional
        Floating dtype the model computes in with these counts; by default torch's default dtype when the model
        runs (inside ``ppvi.fit``, the fit's ``dtype=``). Outside a fit, pass ``torch.float64`` to compare with a
        float64 dense tensor.
    name : str
        The argument's name in error messages.

    Attributes
    ----------
    shape : tuple of int
        ``(D, V)``.
    matrix : scipy.sparse.csr_matrix
        The counts as float64 CSR (sorted indices, no explicit zeros).
    log_coefficient : numpy.ndarray
        ``log(N_d! / prod_w n_dw!)`` per document, the multinomial coefficient that :class:`torch.distributions.
        Multinomial` includes in its ``log_prob``: the sparse likelihood adds it so that it equals the dense one.
    """

    def __init__(
        self,
        counts: np.ndarray | torch.Tensor | scipy.sparse.spmatrix,
        dtype: torch.dtype | None = None,
        name: str = "counts",
    ):
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32, torch.float64 or None, got {dtype!r}")
        self.dtype = dtype
        matrix = _as_sparse(counts, name)
        matrix.sort_indices()
        self.matrix = matrix
        self.shape: tuple[int, int] = (int(matrix.shape[0]), int(matrix.shape[1]))
        self._rows = np.repeat(np.arange(self.shape[0]), np.diff(matrix.indptr))
        lengths = np.asarray(matrix.sum(1)).ravel()
        per_entry = np.bincount(self._rows, weights=scipy.special.gammaln(matrix.data + 1.0), minlength=self.shape[0])
        self.log_coefficient = scipy.special.gammaln(lengths + 1.0) - per_entry
        self._placed: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    @classmethod
    def of(cls, counts, name: str = "counts") -> SparseCounts:
        """``counts`` itself if it is already a :class:`SparseCounts`, else a new one."""
        return counts if isinstance(counts, SparseCounts) else cls(counts, name=name)

    @property
    def nnz(self) -> int:
        """Number of nonzero entries."""
        return int(self.matrix.nnz)

    def __repr__(self) -> str:
        return f"SparseCounts(shape={self.shape}, nnz={self.nnz}, tokens={int(self.matrix.sum())})"

    def to_dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``(D, V)`` tensor (for small corpora and tests)."""
        return torch.as_tensor(self.matrix.toarray(), dtype=dtype)

    def placed(self, device: torch.device | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The CSR arrays as tensors on ``device`` with values in ``dtype``, made once per device and dtype."""
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (device, dtype)
        if key not in self._placed:
            matrix = self.matrix
            self._placed[key] = {
                "indptr": torch.as_tensor(matrix.indptr.astype(np.int64), device=device),
                "columns": torch.as_tensor(matrix.indices.astype(np.int64), device=device),
                "values": torch.as_tensor(matrix.data, dtype=dtype, device=device),
                "rows": torch.as_tensor(self._rows, device=device),
                "log_coefficient": torch.as_tensor(self.log_coefficient, dtype=dtype, device=device),
                "all": torch.arange(self.shape[0], device=device),
            }
        return self._placed[key]

    def documents(self, index: torch.Tensor | None, device: torch.device | None, dtype: torch.dtype) -> _Entries:
        """The nonzero entries of documents ``index`` (all documents for None or ``arange(D)``), their rows
        renumbered ``0..len(index) - 1``."""
        placed = self.placed(device, dtype)
        if index is None or (index.shape[0] == self.shape[0] and torch.equal(index, placed["all"])):
            return _Entries(placed["indptr"], placed["columns"], placed["values"], placed["rows"],
                            placed["log_coefficient"], self.shape[1])
        index = index.to(placed["indptr"].device)
        starts, stops = placed["indptr"][index], placed["indptr"][index + 1]
        lengths = stops - starts
        indptr = torch.zeros(index.shape[0] + 1, dtype=torch.int64, device=index.device)
        torch.cumsum(lengths, 0, out=indptr[1:])
        rows = torch.repeat_interleave(torch.arange(index.shape[0], device=index.device), lengths)
        positions = torch.arange(int(indptr[-1]), device=index.device) + (starts - indptr[:-1])[rows]
        return _Entries(indptr, placed["columns"][positions], placed["values"][positions], rows,
                        placed["log_coefficient"][index], self.shape[1])


@dataclasses.dataclass(frozen=True)
class _Entries:
    """Nonzero entries of a set of documents in CSR form, with each entry's row and each document's multinomial
    coefficient."""

    indptr: torch.Tensor
    columns: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor
    log_coefficient: torch.Tensor
    vocabulary_size: int

    @property
    def num_documents(self) -> int:
        return self.indptr.shape[0] - 1

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """torch CSR tensor ``(documents, V)`` with this sparsity pattern and ``values``."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            return torch.sparse_csr_tensor(
                self.indptr, self.columns, values, (self.num_documents, self.vocabulary_size), check_invariants=False
            )

    def transposed_product(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``W^T dense`` for ``W`` the entries with ``values``, ``(V, K)``: SciPy's CSR-transpose product on the
        CPU (4-10x faster than torch's here, measured on AP), torch's elsewhere."""
        if values.device.type == "cpu":
            scipy_matrix = scipy.sparse.csr_matrix(
                (values.detach().numpy(), self.columns.numpy(), self.indptr.numpy()),
                shape=(self.num_documents, self.vocabulary_size),
            )
            return torch.as_tensor(np.asarray(scipy_matrix.T @ dense.detach().numpy()))
        return self.csr(values).t() @ dense


class _SparseMixtureLogLikelihood(torch.autograd.Function):
    """Per-document ``sum_w n_dw log(theta_d . beta_w)`` over the nonzero entries, with its exact gradient by two
    sparse-dense products (``dL/dtheta = R beta^T``, ``dL/dbeta = theta^T R``, ``R_dw = n_dw / p_dw``) instead of
    autograd through gathers of ``nnz x K`` rows (measured 5-10x slower on AP)."""

    @staticmethod
    def forward(ctx, proportions: torch.Tensor, topics: torch.Tensor, entries: _Entries) -> torch.Tensor:
        pattern = entries.csr(torch.ones_like(entries.values, dtype=proportions.dtype))
        probability = torch.sparse.sampled_addmm(pattern, proportions, topics, beta=0.0).values()
        # A Dirichlet draw can underflow to exact zeros; a zero probability under a positive count would make the
        # log-likelihood -inf, so probabilities are floored at the smallest normal number (as the dense model, and
        # as there no gradient flows through a floored probability).
        tiny = torch.finfo(probability.dtype).tiny
        floored = probability < tiny
        probability = probability.clamp_min(tiny)
        per_entry = entries.values * probability.log()
        per_document = torch.zeros(entries.num_documents, dtype=per_entry.dtype, device=per_entry.device)
        per_document.index_add_(0, entries.rows, per_entry)
        ctx.save_for_backward(proportions, topics, probability, floored)
        ctx.entries = entries
        return per_document

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gradient: torch.Tensor):
        proportions, topics, probability, floored = ctx.saved_tensors
        entries: _Entries = ctx.entries
        weights = (gradient[entries.rows] * entries.values / probability).masked_fill(floored, 0.0)
        gradient_proportions = entries.csr(weights) @ topics.t() if ctx.needs_input_grad[0] else None
        gradient_topics = None
        if ctx.needs_input_grad[1]:
            gradient_topics = entries.transposed_product(weights, proportions.contiguous()).t().to(topics.dtype)
        return gradient_proportions, gradient_topics, None


def sparse_log_likelihood(proportions: torch.Tensor, topics: torch.Tensor, entries: _Entries) -> torch.Tensor:
    """LDA's per-document log-likelihood ``log Multinomial(n_d | N_d, theta_d^T beta)`` from the nonzero entries.

    ``log(N_d! / prod_w n_dw!) + sum_{w: n_dw > 0} n_dw log(theta_d . beta_w)``: the same value as the dense
    ``Multinomial(probs=theta_d^T beta).log_prob(n_d)`` (whose zero counts contribute nothing), at ``nnz x K`` cost.
    ``proportions`` ``(..., B, K)``, ``topics`` ``(..., K, V)``; leading (particle) dimensions take the gather
    path, plain matrices the sparse-product one.
    """
    if proportions.dim() == 2 and topics.dim() == 2:
        per_document = _SparseMixtureLogLikelihood.apply(proportions, topics, entries)
    else:
        gathered = proportions[..., entries.rows, :] * topics.transpose(-1, -2)[..., entries.columns, :]
        probability = gathered.sum(-1).clamp_min(torch.finfo(gathered.dtype).tiny)
        per_entry = entries.values * probability.log()
        shape = (*per_entry.shape[:-1], entries.num_documents)
        per_document = per_entry.new_zeros(shape).index_add(-1, entries.rows, per_entry)
    return per_document + entries.log_coefficient


# --- simulation -------------------------------------------------------------------------------------------------


def simulate(
    num_documents: int = DEFAULT_NUM_DOCUMENTS,
    vocabulary_size: int = DEFAULT_VOCABULARY_SIZE,
    num_topics: int = DEFAULT_NUM_TOPICS,
    document_length: int = DEFAULT_DOCUMENT_LENGTH,
    topic_concentration: float = DEFAULT_TOPIC_CONCENTRATION,
    document_concentration: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw a corpus from LDA with a private generator (the global random state is untouched).

    ``topics_k ~ Dirichlet(eta)``, ``theta_d ~ Dirichlet(alpha)`` and ``counts_d ~ Multinomial(N, theta_d^T
    topics)``: the generative process of Blei, Ng & Jordan (2003) with the topic assignments summed out.

    Parameters
    ----------
    num_documents, vocabulary_size, num_topics, document_length : int
        ``D``, ``V``, ``K`` and the tokens per document ``N``.
    topic_concentration : float
        ``eta``.
    document_concentration : float, optional
        ``alpha``; by default ``1 / K`` (scikit-learn's default ``doc_topic_prior``).
    seed : int
        Seed of the private generator.

    Returns
    -------
    counts : numpy.ndarray
        Word counts, shape ``(D, V)``, int64.
    topics : numpy.ndarray
        Topic-word probabilities, shape ``(K, V)``, rows on the simplex.
    proportions : numpy.ndarray
        Document-topic proportions ``theta``, shape ``(D, K)``.
    """
    alpha = 1.0 / num_topics if document_concentration is None else document_concentration
    generator = np.random.default_rng(seed)
    topics = generator.dirichlet(np.full(vocabulary_size, topic_concentration), size=num_topics)
    proportions = generator.dirichlet(np.full(num_topics, alpha), size=num_documents)
    probabilities = proportions @ topics
    probabilities /= probabilities.sum(1, keepdims=True)
    counts = np.stack([generator.multinomial(document_length, p) for p in probabilities])
    return counts.astype(np.int64), topics, proportions


# --- LDA --------------------------------------------------------------------------------------------------------


def _concentrations(num_topics: int, document_concentration, topic_concentration) -> tuple[float, float]:
    if not isinstance(num_topics, int) or num_topics < 2:
        raise ValueError(f"num_topics must be an integer of at least 2, got {num_topics!r}")
    alpha = 1.0 / num_topics if document_concentration is None else float(document_concentration)
    eta = 1.0 / num_topics if topic_concentration is None else float(topic_concentration)
    if not (alpha > 0 and eta > 0):
        raise ValueError(f"the Dirichlet concentrations must be positive, got alpha={alpha}, eta={eta}")
    return alpha, eta


def model(
    counts: torch.Tensor | SparseCounts | scipy.sparse.spmatrix | None = None,
    num_topics: int = DEFAULT_NUM_TOPICS,
    document_concentration: float | None = None,
    topic_concentration: float | None = None,
    *,
    num_documents: int = DEFAULT_NUM_DOCUMENTS,
    vocabulary_size: int = DEFAULT_VOCABULARY_SIZE,
    document_length: int = DEFAULT_DOCUMENT_LENGTH,
    subsample_size: int | None = None,
) -> torch.Tensor | SparseCounts:
    """Pyro model of LDA (Blei, Ng & Jordan 2003) with the topic assignments marginalised.

    With dense counts the observed site ``words`` is ``Multinomial(N_d, theta_d^T beta)``; with sparse counts
    (:class:`SparseCounts`, or a scipy.sparse matrix, converted on every call: convert it once for training) it is
    a ``pyro.factor`` of the same per-document log-likelihood computed from the nonzero entries only
    (:func:`sparse_log_likelihood`, multinomial coefficient included), so both give the same ELBO.

    Parameters
    ----------
    counts : torch.Tensor, SparseCounts or scipy.sparse matrix, optional
        Word counts, shape ``(D, V)`` (a dense tensor must be floating). With None the model draws
        ``num_documents`` documents of ``document_length`` tokens over ``vocabulary_size`` words.
    num_topics : int
        ``K``.
    document_concentration, topic_concentration : float, optional
        ``alpha`` and ``eta`` of the symmetric Dirichlet priors; both default to ``1 / K``, scikit-learn's
        defaults for ``LatentDirichletAllocation``.
    num_documents, vocabulary_size, document_length : int
        Sizes when simulating (ignored when ``counts`` is given).
    subsample_size : int, optional
        Minibatch of documents (``pyro.plate("documents", D, subsample_size=...)``): the likelihood is scaled by
        ``D / subsample_size``, as in stochastic variational inference (Hoffman, Blei, Wang & Paisley 2013).

    Returns
    -------
    torch.Tensor or SparseCounts
        The counts of the documents in the (sub)sample: observed (dense, or the :class:`SparseCounts` itself for
        sparse input) or drawn.
    """
    alpha, eta = _concentrations(num_topics, document_concentration, topic_concentration)
    sparse = None
    if isinstance(counts, SparseCounts) or scipy.sparse.issparse(counts):
        sparse = SparseCounts.of(counts)
        num_documents, vocabulary_size = sparse.shape
        dtype, device = sparse.dtype or torch.get_default_dtype(), None
    elif counts is not None:
        if not isinstance(counts, torch.Tensor):
            raise ValueError(
                f"counts must be a torch.Tensor, a models.lda.SparseCounts or a scipy.sparse matrix, got "
                f"{type(counts).__name__}"
            )
        if counts.dim() != 2:
            raise ValueError(f"counts must have shape (documents, vocabulary), got {tuple(counts.shape)}")
        _check_count_tensor(counts)
        num_documents, vocabulary_size = counts.shape
    if sparse is None:
        dtype = counts.dtype if counts is not None and counts.is_floating_point() else torch.get_default_dtype()
        device = counts.device if counts is not None else None
    with pyro.plate("topic", num_topics):
        topics = pyro.sample("topics", dist.Dirichlet(torch.full((vocabulary_size,), eta, dtype=dtype, device=device)))
    if sparse is not None:
        device = topics.device
    with pyro.plate("documents", num_documents, subsample_size=subsample_size) as index:
        proportions = pyro.sample(
            "topic_proportions", dist.Dirichlet(torch.full((num_topics,), alpha, dtype=dtype, device=device))
        )
        if sparse is not None:
            entries = sparse.documents(index, device, dtype)
            pyro.factor("words", sparse_log_likelihood(proportions, topics, entries))
            return sparse
        # A Dirichlet draw can underflow to exact zeros in float32; a word with zero probability but a positive
        # count would make the log-likelihood -inf, so probabilities are floored at the smallest normal number.
        probabilities = (proportions @ topics).clamp_min(torch.finfo(dtype).tiny)
        if counts is None:
            return pyro.sample("words", dist.Multinomial(document_length, probs=probabilities))
        # validate_args=False: documents have different lengths, which torch's single total_count cannot
        # express; the log-likelihood itself does not depend on total_count.
        return pyro.sample("words", dist.Multinomial(probs=probabilities, validate_args=False), obs=counts[index])


class MeanFieldDirichletGuide(nn.Module):
    """Mean-field guide of LDA: ``q(beta_k) = Dirichlet(lambda_k)``, ``q(theta_d) = Dirichlet(gamma_d)``.

    The variational family of Blei, Ng & Jordan (2003, §5) (there with the assignments ``z`` kept; here they are
    summed out in the model), fitted by stochastic gradients instead of coordinate ascent. As at the coordinate
    ascent optimum (``lambda = eta + expected counts``, ``gamma_d = alpha + expected counts``), the
    concentrations are the prior's plus a positive excess, ``lambda = eta + exp(log excess)``, so they never fall
    below the prior's (where float32 Dirichlet draws degenerate). The excess starts as scikit-learn's topics do
    (``Gamma(100, 1/100)`` noise, which breaks the symmetry between topics) scaled to the average number of tokens
    per topic and word, and at ``N_d / K`` for documents. Call it with the model's arguments.

    Parameters
    ----------
    counts : array-like, scipy.sparse matrix or SparseCounts
        The training counts ``(D, V)`` (used for the sizes and the starting values only).
    num_topics : int
        ``K``.
    document_concentration, topic_concentration : float, optional
        ``alpha`` and ``eta`` of the model (default ``1 / K`` each).
    seed : int
        Seed of the starting values.
    """

    def __init__(
        self,
        counts,
        num_topics: int,
        document_concentration: float | None = None,
        topic_concentration: float | None = None,
        seed: int = 0,
    ):
        super().__init__()
        counts = SparseCounts.of(counts).matrix
        self.document_concentration, self.topic_concentration = _concentrations(
            num_topics, document_concentration, topic_concentration
        )
        num_documents, vocabulary_size = counts.shape
        generator = np.random.default_rng(seed)
        # Gamma(100, 1/100): mean 1, sd 0.1, scikit-learn's _init_latent_vars.
        noise = generator.gamma(100.0, 0.01, size=(num_topics, vocabulary_size))
        tokens_per_cell = counts.sum() / (num_topics * vocabulary_size)
        topic_start = noise * max(tokens_per_cell, 1.0)
        lengths = np.asarray(counts.sum(1)).ravel()
        document_start = np.repeat(np.maximum(lengths / num_topics, 1.0)[:, None], num_topics, axis=1)
        self.log_topic_excess = nn.Parameter(torch.as_tensor(np.log(topic_start)))
        self.log_document_excess = nn.Parameter(torch.as_tensor(np.log(document_start)))

    def topic_concentrations(self) -> torch.Tensor:
        """``lambda``, shape ``(K, V)``."""
        return self.topic_concentration + self.log_topic_excess.exp()

    def document_concentrations(self) -> torch.Tensor:
        """``gamma``, shape ``(D, K)``."""
        return self.document_concentration + self.log_document_excess.exp()

    def forward(self, counts=None, num_topics=None, document_concentration=None, topic_concentration=None, *,
                subsample_size: int | None = None, **sizes) -> None:
        num_documents = self.log_document_excess.shape[0]
        with pyro.plate("topic", self.log_topic_excess.shape[0]):
            pyro.sample("topics", dist.Dirichlet(self.topic_concentrations()))
        with pyro.plate("documents", num_documents, subsample_size=subsample_size) as index:
            excess = self.log_document_excess[index].exp()
            pyro.sample("topic_proportions", dist.Dirichlet(self.document_concentration + excess))

    def topic_word(self) -> np.ndarray:
        """Posterior mean of the topics, ``lambda_k / sum(lambda_k)``, shape ``(K, V)``."""
        concentration = self.topic_concentrations().detach().double().cpu().numpy()
        return concentration / concentration.sum(1, keepdims=True)

    def document_topic(self) -> np.ndarray:
        """Posterior mean of the training documents' topic proportions, shape ``(D, K)``."""
        concentration = self.document_concentrations().detach().double().cpu().numpy()
        return concentration / concentration.sum(1, keepdims=True)


# --- ProdLDA ----------------------------------------------------------------------------------------------------


def laplace_dirichlet_prior(concentration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Laplace approximation to ``Dirichlet(alpha)`` in the softmax basis (MacKay 1998; Srivastava & Sutton
    2017, eq. 3): a Gaussian on ``z`` with ``theta = softmax(z)``,

    ``mu_k = log alpha_k - (1/K) sum_i log alpha_i`` and
    ``sigma_k^2 = (1/alpha_k)(1 - 2/K) + (1/K^2) sum_i 1/alpha_i``.

    Parameters
    ----------
    concentration : torch.Tensor
        ``alpha``, shape ``(K,)``.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``mu`` and ``sigma`` (the standard deviation), each of shape ``(K,)``.
    """
    num_topics = concentration.shape[-1]
    log_alpha = concentration.log()
    loc = log_alpha - log_alpha.mean(-1, keepdim=True)
    variance = (1.0 / concentration) * (1.0 - 2.0 / num_topics) + (1.0 / concentration).sum(-1, keepdim=True) / (
        num_topics**2
    )
    return loc, variance.sqrt()


def _batch_norm(layer: nn.BatchNorm1d, value: torch.Tensor) -> torch.Tensor:
    """Batch normalisation over every leading dimension (so draws and particles may be batched in front)."""
    return layer(value.reshape(-1, value.shape[-1])).reshape(value.shape)


class ProdLDA(nn.Module):
    """ProdLDA (Srivastava & Sutton 2017): amortized encoder guide and product-of-experts decoder in one module.

    ``module.model(counts, subsample_size=...)`` is the Pyro model; calling the module is the guide,
    ``q(z_d | w_d) = N(mu(w_d), diag(sigma(w_d)^2))`` with the paper's encoder (two softplus layers, dropout,
    batch-normalised mean and log-variance). The decoder ``softmax(BN(dropout(theta) B))`` with ``B`` of shape
    ``(K, V)`` lives here too, so that ``ppvi.fit(module.model, counts, guide=module)`` moves and trains both.
    Call ``module.eval()`` before using the fitted topics (:meth:`topic_word` does this).

    Parameters
    ----------
    vocabulary_size, num_topics : int
        ``V`` and ``K``.
    document_concentration : float
        ``alpha`` of the Dirichlet the logistic-normal prior approximates (the paper uses 1).
    hidden_size : int
        Width of the encoder's two hidden layers.
    dropout : float
        Dropout rate on the encoder's hidden output and on ``theta``.
    """

    def __init__(
        self,
        vocabulary_size: int,
        num_topics: int,
        document_concentration: float = 1.0,
        hidden_size: int = DEFAULT_HIDDEN_SIZE,
        dropout: float = DEFAULT_DROPOUT,
        decoder_normalization: bool = True,
    ):
        super().__init__()
        _concentrations(num_topics, document_concentration, None)
        self.vocabulary_size, self.num_topics = vocabulary_size, num_topics
        self.document_concentration = float(document_concentration)
        self.hidden = nn.Sequential(
            nn.Linear(vocabulary_size, hidden_size), nn.Softplus(), nn.Linear(hidden_size, hidden_size), nn.Softplus(),
            nn.Dropout(dropout),
        )
        self.location = nn.Linear(hidden_size, num_topics)
        self.log_variance = nn.Linear(hidden_size, num_topics)
        # affine=False as in the paper's code: normalisation only, no learnt rescaling that could undo it.
        self.location_norm = nn.BatchNorm1d(num_topics, affine=False)
        self.log_variance_norm = nn.BatchNorm1d(num_topics, affine=False)
        self.theta_dropout = nn.Dropout(dropout)
        self.topics = nn.Linear(num_topics, vocabulary_size, bias=False)
        self.decoder_norm = nn.BatchNorm1d(vocabulary_size, affine=False) if decoder_normalization else None

    def _prior(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = torch.full((self.num_topics,), self.document_concentration, dtype=like.dtype, device=like.device)
        return laplace_dirichlet_prior(alpha)

    def _check(self, counts: torch.Tensor) -> None:
        if counts.dim() != 2 or counts.shape[1] != self.vocabulary_size:
            raise ValueError(
                f"counts must have shape (documents, {self.vocabulary_size}) for this ProdLDA, "
                f"got {tuple(counts.shape)}"
            )
        _check_count_tensor(counts)

    def model(self, counts: torch.Tensor, subsample_size: int | None = None) -> torch.Tensor:
        """The ProdLDA model: ``z_d ~ N(mu_0, sigma_0^2)``, ``w_d ~ Multinomial(softmax(BN(softmax(z_d) B)))``."""
        self._check(counts)
        loc, scale = self._prior(self.topics.weight)
        with pyro.plate("documents", counts.shape[0], subsample_size=subsample_size) as index:
            logits = pyro.sample("topic_logits", dist.Normal(loc, scale).to_event(1))
            proportions = self.theta_dropout(functional.softmax(logits, -1))
            word_logits = self.topics(proportions)
            if self.decoder_norm is not None:
                word_logits = _batch_norm(self.decoder_norm, word_logits)
            return pyro.sample("words", dist.Multinomial(logits=word_logits, validate_args=False), obs=counts[index])

    def encode(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of ``q(z_d | w_d)`` for documents ``counts`` (``(..., V)``)."""
        hidden = self.hidden(counts)
        location = _batch_norm(self.location_norm, self.location(hidden))
        log_variance = _batch_norm(self.log_variance_norm, self.log_variance(hidden))
        return location, (0.5 * log_variance).exp()

    def forward(self, counts: torch.Tensor, subsample_size: int | None = None) -> None:
        self._check(counts)
        with pyro.plate("documents", counts.shape[0], subsample_size=subsample_size) as index:
            location, scale = self.encode(counts[index])
            pyro.sample("topic_logits", dist.Normal(location, scale).to_event(1))

    def topic_word(self) -> np.ndarray:
        """The topics as the decoder uses them in evaluation mode, ``(K, V)`` unnormalised log-weights.

        With dropout off and batch normalisation at its running statistics ``m, s``, the decoder is
        ``softmax(sum_k theta_k (B_kv - m_v) / s_v)`` because ``sum_k theta_k = 1``: row ``k`` is the word
        log-weights of topic ``k`` (its own distribution is ``softmax`` of the row).
        """
        self.eval()
        weight = self.topics.weight.detach().double().cpu().T  # (K, V)
        if self.decoder_norm is None:
            return weight.numpy()
        mean = self.decoder_norm.running_mean.detach().double().cpu()
        scale = (self.decoder_norm.running_var.detach().double().cpu() + self.decoder_norm.eps).sqrt()
        return ((weight - mean) / scale).numpy()


# --- fitting ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TopicFit:
    """A fitted topic model.

    Attributes
    ----------
    topic_word : numpy.ndarray
        ``(K, V)``: topic-word probabilities (``combination="mixture"``, LDA) or unnormalised log-weights
        (``"product"``, ProdLDA).
    combination : {"mixture", "product"}
        How a document's topics combine: ``theta^T topic_word`` or ``softmax(theta^T topic_word)``.
    fit : ppvi.Fit
        The ppvi fit (guide, ELBO trace, steps, seconds).
    """

    topic_word: np.ndarray
    combination: Combination
    fit: object

    @property
    def seconds(self) -> float:
        """Wall time of the fit."""
        return self.fit.seconds

    def top_words(self, vocabulary: list[str] | None = None, count: int = DEFAULT_TOP_WORDS) -> list[list]:
        """The ``count`` most probable words of each topic (indices when ``vocabulary`` is None)."""
        return top_words(self.topic_word, vocabulary, count)

    def perplexity(
        self, counts, observed_fraction: float = 0.5, seed: int = 0, max_documents: int | None = None
    ) -> float:
        """Held-out perplexity of ``counts`` by document completion (:func:`held_out_perplexity`)."""
        return held_out_perplexity(self.topic_word, counts, self.combination, observed_fraction, seed, max_documents)


def _dense_tensor(counts) -> torch.Tensor:
    return torch.as_tensor(_as_counts(counts))


def _steps(num_documents: int, subsample_size: int | None, epochs: int) -> int:
    batches = 1 if subsample_size is None else math.ceil(num_documents / subsample_size)
    return max(1, epochs * batches)


def fit_lda(
    counts: np.ndarray | torch.Tensor | scipy.sparse.spmatrix | SparseCounts,
    num_topics: int,
    *,
    document_concentration: float | None = None,
    topic_concentration: float | None = None,
    epochs: int = 200,
    subsample_size: int | None = None,
    learning_rate: float = DEFAULT_LDA_LEARNING_RATE,
    schedule: str = "constant",
    device: str = "auto",
    dtype: str = "float64",
    seed: int = 0,
    guide: MeanFieldDirichletGuide | None = None,
) -> TopicFit:
    """Fit LDA with the mean-field Dirichlet guide by ``ppvi.fit`` (``TraceMeanField_ELBO``, Adam), on the
    nonzero counts only (:class:`SparseCounts`).

    Each step costs ``nnz x K`` for the likelihood of the documents in the step (:func:`sparse_log_likelihood`)
    plus ``K x V`` for drawing the topics, their implicit-reparameterisation gradient (Figurnov, Mohamed & Mnih
    2018) and their closed-form KL. Minibatches of documents (``subsample_size``, stochastic variational inference
    with the likelihood scaled by ``D / subsample_size``, Hoffman, Blei, Wang & Paisley 2013) pay when the
    likelihood dominates, i.e. when ``nnz`` is large against ``V``: measured at learning rate 0.3 on one busy CPU
    thread, 20 Newsgroups (11,258 documents, 1,995 words, K=20) came within 2 % of scikit-learn's held-out
    perplexity after 76 steps of 2,000 documents (5 s, ``benchmarks/lda_speed.py``) against 50 full-batch steps
    (15 s); on AP (1,800 documents, 10,473 words, K=10, where the topics' ``K x V`` work dominates) full batches
    were faster (3,349 after 60 steps, 12 s) than batches of 600 (3,414 after 90 steps, 13 s).

    Parameters
    ----------
    counts : array-like, torch.Tensor, scipy.sparse matrix or SparseCounts
        Word counts ``(D, V)``; never densified.
    num_topics : int
        ``K``.
    document_concentration, topic_concentration : float, optional
        ``alpha``, ``eta`` (default ``1 / K`` each, as scikit-learn).
    epochs : int
        Passes over the documents (steps = epochs x minibatches per epoch).
    subsample_size : int, optional
        Documents per minibatch; None trains on all documents each step.
    learning_rate : float
        Adam's learning rate on the log-concentrations (see :data:`DEFAULT_LDA_LEARNING_RATE`).
    schedule : {"constant", "exponential", "cosine"}
        Learning-rate schedule of :func:`ppvi.fit` (the last ``min(100, steps // 2)`` iterates are averaged).
    device, dtype : str
        As for :func:`ppvi.fit`. float64 by default: in float32 the ELBO turned NaN after ~130-140 steps on 20
        Newsgroups (K=50, minibatches of 1,000). Autograd anomaly detection traced the first NaN to torch's
        float32 Dirichlet backward (``_DirichletBackward``, the implicit-reparameterisation gradient) of the
        documents' proportions, whose concentrations then spanned 0.1 to ~1,500; drawing in float64 and casting
        back did not remove the NaN (it came at step 128 instead), so the cause is not only that gradient and
        float32 is left unsupported for this guide rather than patched by an unexplained clamp.
    seed : int
        Seed of the guide's start and of training.
    guide : MeanFieldDirichletGuide, optional
        The guide to train (for example one that records its topics during training, or a warm start); by
        default a new one started from ``counts`` with ``seed``. Its sizes must match ``counts`` and
        ``num_topics``.

    Returns
    -------
    TopicFit
        With the posterior-mean topics (``combination="mixture"``).
    """
    from ppvi import fit

    sparse = SparseCounts.of(counts)
    if guide is None:
        guide = MeanFieldDirichletGuide(sparse, num_topics, document_concentration, topic_concentration, seed=seed)
    elif not isinstance(guide, MeanFieldDirichletGuide):
        raise ValueError(f"guide must be a MeanFieldDirichletGuide or None, got {type(guide).__name__}")
    elif (guide.log_document_excess.shape[0], *guide.log_topic_excess.shape) != (sparse.shape[0], num_topics,
                                                                                 sparse.shape[1]):
        raise ValueError(
            f"the guide is for {guide.log_document_excess.shape[0]} documents, {guide.log_topic_excess.shape[0]} "
            f"topics and {guide.log_topic_excess.shape[1]} words; counts have shape {sparse.shape} and "
            f"num_topics={num_topics}"
        )
    result = fit(
        model, sparse, num_topics, document_concentration, topic_concentration, guide=guide,
        steps=_steps(sparse.shape[0], subsample_size, epochs), subsample_size=subsample_size,
        learning_rate=learning_rate, schedule=schedule, device=device, dtype=dtype, seed=seed, progress=False,
    )
    return TopicFit(guide.topic_word(), "mixture", result)


def fit_prodlda(
    counts,
    num_topics: int,
    *,
    document_concentration: float = 1.0,
    hidden_size: int = DEFAULT_HIDDEN_SIZE,
    dropout: float = DEFAULT_DROPOUT,
    decoder_normalization: bool = True,
    epochs: int = 50,
    subsample_size: int | None = 200,
    learning_rate: float = 0.002,
    device: str = "auto",
    dtype: str = "float32",
    seed: int = 0,
) -> TopicFit:
    """Fit ProdLDA (Srivastava & Sutton 2017) with its amortized encoder by ``ppvi.fit`` on minibatches.

    Parameters
    ----------
    counts : array-like or scipy.sparse matrix
        Word counts ``(D, V)``.
    num_topics : int
        ``K``.
    document_concentration : float
        ``alpha`` of the approximated Dirichlet prior (the paper's 1).
    hidden_size, dropout, decoder_normalization
        Encoder width, dropout rate and whether the decoder batch-normalises (:class:`ProdLDA`).
    epochs : int
        Passes over the documents. On 20 Newsgroups at K=50 (batches of 200, learning rate 0.002) the NPMI of the
        topics was 0.156 after 20 epochs and 0.233 after 50 (the paper reports ~0.24); at 0.005 it was 0.172 and
        0.213 (measured). 50 epochs took ~1 minute on 2 idle CPU cores, ~5 on one busy core.
    subsample_size : int, optional
        Documents per minibatch (the paper's 200); None for full batches.
    learning_rate : float
        Adam's learning rate (the paper's 0.002; its code also sets Adam's ``beta1 = 0.99``, which ``ppvi.fit``
        does not expose: Adam runs with torch's default 0.9).
    device, dtype : str
        As for :func:`ppvi.fit`.
    seed : int
        Seed of the network's initial weights and of training.

    Returns
    -------
    TopicFit
        With the decoder's topics as log-weights (``combination="product"``).
    """
    from ppvi import fit

    dense = _dense_tensor(counts)
    torch.manual_seed(seed)
    module = ProdLDA(dense.shape[1], num_topics, document_concentration, hidden_size, dropout, decoder_normalization)
    module.train()
    result = fit(
        module.model, dense, guide=module, steps=_steps(dense.shape[0], subsample_size, epochs),
        subsample_size=subsample_size, learning_rate=learning_rate, device=device, dtype=dtype, seed=seed,
        progress=False,
    )
    return TopicFit(module.topic_word(), "product", result)


# --- evaluation -------------------------------------------------------------------------------------------------


def top_words(
    topic_word: np.ndarray, vocabulary: list[str] | None = None, count: int = DEFAULT_TOP_WORDS
) -> list[list]:
    """The ``count`` highest-weighted words of each topic (row of ``topic_word``), most probable first.

    Returns words when ``vocabulary`` is given, else column indices.
    """
    topic_word = np.asarray(topic_word)
    if vocabulary is not None and len(vocabulary) != topic_word.shape[1]:
        raise ValueError(f"vocabulary has {len(vocabulary)} words but the topics have {topic_word.shape[1]} columns")
    order = np.argsort(-topic_word, axis=1, kind="stable")[:, :count]
    return [[vocabulary[i] for i in row] if vocabulary is not None else row.tolist() for row in order]


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total-variation distance ``(1/2) sum_v |p_v - q_v|`` between rows of ``p`` and ``q`` (broadcast)."""
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(-1)


def match_topics(estimated: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Match estimated topics to reference topics by the Hungarian algorithm on total-variation distance.

    Parameters
    ----------
    estimated, reference : numpy.ndarray
        Topic-word probabilities, each ``(K, V)``.

    Returns
    -------
    assignment : numpy.ndarray
        ``assignment[k]`` is the estimated topic matched to reference topic ``k``.
    distances : numpy.ndarray
        Total-variation distance of each matched pair, ``(K,)``.
    """
    estimated, reference = np.asarray(estimated), np.asarray(reference)
    if estimated.shape != reference.shape:
        raise ValueError(f"topic matrices differ in shape: {estimated.shape} vs {reference.shape}")
    cost = total_variation(reference[:, None, :], estimated[None, :, :])
    rows, columns = linear_sum_assignment(cost)
    return columns, cost[rows, columns]


def completion_split(counts, observed_fraction: float = 0.5, seed: int = 0):
    """Split each document's tokens at random: every token is observed with probability ``observed_fraction``.

    Binomial thinning of each count, so the two halves are a uniformly random partition of the tokens.

    Returns
    -------
    (scipy.sparse.csr_matrix, scipy.sparse.csr_matrix)
        The observed and held-out counts, each ``(D, V)``, summing to ``counts``.
    """
    if not 0 < observed_fraction < 1:
        raise ValueError(f"observed_fraction must lie strictly between 0 and 1, got {observed_fraction}")
    matrix = _as_sparse(counts)
    generator = np.random.default_rng(seed)
    observed = matrix.copy()
    observed.data = generator.binomial(matrix.data.astype(np.int64), observed_fraction).astype(np.float64)
    held_out = matrix - observed
    observed.eliminate_zeros()
    held_out.eliminate_zeros()
    return observed, held_out


#: Fold-in iterations: EM for mixtures (each at least as good as the last; on 20 Newsgroups at K=50 the perplexity
#: changes by less than 0.1 % past 300) and L-BFGS-B for products, whose optimum often lies on the simplex's
#: boundary (logits running off to -inf, so convergence is slow): measured on 1,000 20 Newsgroups test documents
#: with a K=50 ProdLDA, the perplexity is 823.0 / 822.0 / 820.3 / 819.3 after 25 / 50 / 100 / 200 iterations, so
#: 100 leaves it ~0.1 % high (an evaluation costs a documents x topics x vocabulary product; 100 keeps the whole
#: test set to about a minute).
FOLD_IN_ITERATIONS = {"mixture": 300, "product": 100}


def fold_in(topic_word: np.ndarray, counts, combination: Combination = "mixture",
            iterations: int | None = None) -> np.ndarray:
    """Maximum-likelihood topic proportions of documents with the topics fixed ("folding in").

    ``theta_d = argmax_{theta in simplex} sum_v n_dv log p_v(theta)`` with ``p(theta) = theta^T topic_word``
    (``"mixture"``) or ``softmax(theta^T topic_word)`` (``"product"``). Both objectives are concave in
    ``theta`` (a log of a linear function; a linear function minus a log-sum-exp of one), so the maximum is
    global: mixtures are solved by EM (``theta_k <- theta_k sum_v n_v topic_kv / p_v / N_d``, the fixed point of
    the concave problem), products by L-BFGS-B on ``theta = softmax(eta)`` with the exact gradient. Documents
    without tokens get the uniform ``theta``. ``iterations`` defaults to :data:`FOLD_IN_ITERATIONS`.

    Returns
    -------
    numpy.ndarray
        ``(D, K)``.
    """
    matrix = _as_sparse(counts)
    topic_word = np.asarray(topic_word, dtype=np.float64)
    if matrix.shape[1] != topic_word.shape[1]:
        raise ValueError(f"counts have {matrix.shape[1]} words but the topics {topic_word.shape[1]}")
    if combination not in FOLD_IN_ITERATIONS:
        raise ValueError(f"combination must be 'mixture' or 'product', got {combination!r}")
    iterations = FOLD_IN_ITERATIONS[combination] if iterations is None else iterations
    if combination == "mixture":
        return _fold_in_mixture(topic_word, matrix, iterations)
    return _fold_in_product(topic_word, matrix, iterations)



def _fold_in_mixture(topic_word: np.ndarray, matrix: scipy.sparse.csr_matrix, iterations: int) -> np.ndarray:
    num_documents, num_topics = matrix.shape[0], topic_word.shape[0]
    rows = np.repeat(np.arange(num_documents), np.diff(matrix.indptr))
    columns, values = matrix.indices, matrix.data
    topics_by_word = topic_word.T  # (V, K)
    lengths = np.asarray(matrix.sum(1)).ravel()
    theta = np.full((num_documents, num_topics), 1.0 / num_topics)
    ratio = matrix.copy()
    gathered = topics_by_word[columns]  # (nnz, K)
    for _ in range(iterations):
        word_probability = np.einsum("nk,nk->n", theta[rows], gathered)
        ratio.data = values / np.maximum(word_probability, np.finfo(np.float64).tiny)
        theta = theta * (ratio @ topics_by_word) / np.maximum(lengths, 1.0)[:, None]
    theta[lengths == 0] = 1.0 / num_topics
    return theta / theta.sum(1, keepdims=True)


#: Documents per L-BFGS problem in the product fold-in (bounds the dense documents x vocabulary work array).
FOLD_IN_CHUNK = 2048
#: Stopping tolerances of the product fold-in's L-BFGS-B: relative change of the summed log-likelihood (a chunk
#: sums ~10^5-10^6 nats, so ~10^-4 nats) and largest gradient entry (nats per unit of logit).
FOLD_IN_RELATIVE_TOLERANCE = 1e-10
FOLD_IN_GRADIENT_TOLERANCE = 1e-6


def _product_objective(
    flat_logits: np.ndarray, counts: np.ndarray, lengths: np.ndarray, topic_word: np.ndarray
) -> tuple[float, np.ndarray]:
    """Negative log-likelihood ``-sum_dv n_dv log softmax(theta_d^T topic_word)_v`` at ``theta_d = softmax(eta_d)``
    and its exact gradient in ``eta`` (the chain rule through both softmaxes), for SciPy's L-BFGS-B."""
    logits = flat_logits.reshape(counts.shape[0], topic_word.shape[0])
    theta = scipy.special.softmax(logits, axis=1)
    word_logits = theta @ topic_word
    word_logits -= word_logits.max(1, keepdims=True)  # softmax is shift-invariant; this keeps exp finite
    word_probability = np.exp(word_logits)
    total = word_probability.sum(1)
    word_probability /= total[:, None]
    value = lengths @ np.log(total) - (counts * word_logits).sum()
    gradient_theta = (lengths[:, None] * word_probability - counts) @ topic_word.T
    gradient_logits = theta * (gradient_theta - (theta * gradient_theta).sum(1, keepdims=True))
    return float(value), gradient_logits.ravel()


def _fold_in_product(topic_word: np.ndarray, matrix: scipy.sparse.csr_matrix, iterations: int) -> np.ndarray:
    # NumPy and SciPy's Fortran L-BFGS-B rather than torch: the problem is a few small matrix products per
    # evaluation, where torch's per-operation overhead (and its thread synchronisation on a busy machine, measured
    # 10x slower with two threads than with one) dominated the earlier autograd version.
    num_topics = topic_word.shape[0]
    parts = []
    for start in range(0, matrix.shape[0], FOLD_IN_CHUNK):
        chunk = matrix[start : start + FOLD_IN_CHUNK].toarray()
        lengths = chunk.sum(1)
        result = scipy.optimize.minimize(
            _product_objective, np.zeros(chunk.shape[0] * num_topics), args=(chunk, lengths, topic_word), jac=True,
            method="L-BFGS-B",
            options={"maxiter": iterations, "ftol": FOLD_IN_RELATIVE_TOLERANCE, "gtol": FOLD_IN_GRADIENT_TOLERANCE},
        )
        parts.append(scipy.special.softmax(result.x.reshape(chunk.shape[0], num_topics), axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, num_topics))


def log_likelihood(topic_word: np.ndarray, proportions: np.ndarray, counts,
                   combination: Combination = "mixture") -> np.ndarray:
    """Per-document ``sum_v n_dv log p_v(theta_d)`` (the multinomial coefficient left out), shape ``(D,)``."""
    matrix = _as_sparse(counts)
    topic_word = np.asarray(topic_word, dtype=np.float64)
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    if combination == "mixture":
        word_probability = np.einsum("nk,nk->n", proportions[rows], topic_word.T[matrix.indices])
        log_probability = np.log(np.maximum(word_probability, np.finfo(np.float64).tiny))
    elif combination == "product":
        word_logits = proportions @ topic_word
        normaliser = scipy.special.logsumexp(word_logits, axis=1)
        log_probability = word_logits[rows, matrix.indices] - normaliser[rows]
    else:
        raise ValueError(f"combination must be 'mixture' or 'product', got {combination!r}")
    return np.bincount(rows, weights=matrix.data * log_probability, minlength=matrix.shape[0])


def held_out_perplexity(
    topic_word: np.ndarray,
    counts,
    combination: Combination = "mixture",
    observed_fraction: float = 0.5,
    seed: int = 0,
    max_documents: int | None = None,
) -> float:
    """Held-out per-word perplexity by document completion (Wallach et al. 2009, §4).

    Each document's tokens are split at random (:func:`completion_split`); ``theta_d`` is fitted to the observed
    part by maximum likelihood with the topics fixed (:func:`fold_in`); the perplexity is
    ``exp(-sum_d log p(held-out part of d | theta_d) / held-out tokens)``. The same function evaluates any
    model's topics (ours, scikit-learn's ``components_`` normalised by row), so the numbers are comparable; it is
    not scikit-learn's ``perplexity()``, which scores whole documents by its variational bound.

    Parameters
    ----------
    topic_word : numpy.ndarray
        ``(K, V)`` topics (probabilities for ``"mixture"``, log-weights for ``"product"``).
    counts : array-like or scipy.sparse matrix
        Held-out documents ``(D, V)``.
    combination : {"mixture", "product"}
        LDA's or ProdLDA's way of combining topics.
    observed_fraction : float
        Share of each document's tokens used to fit ``theta_d``.
    seed : int
        Seed of the split and of the subset (use the same seed to compare models).
    max_documents : int, optional
        Evaluate on a random subset of this many documents (the same subset for the same seed and corpus): the
        product fold-in costs ``documents x K x V`` per iteration, so a subset keeps ProdLDA's evaluation short.
    """
    matrix = _as_sparse(counts)
    if max_documents is not None and max_documents < matrix.shape[0]:
        if max_documents < 1:
            raise ValueError(f"max_documents must be a positive integer or None, got {max_documents!r}")
        chosen = np.sort(np.random.default_rng(seed).choice(matrix.shape[0], max_documents, replace=False))
        matrix = matrix[chosen]
    observed, held_out = completion_split(matrix, observed_fraction, seed)
    proportions = fold_in(topic_word, observed, combination)
    total = held_out.sum()
    if total == 0:
        raise ValueError("no held-out tokens: the documents are empty (or too short for the split)")
    return float(np.exp(-log_likelihood(topic_word, proportions, held_out, combination).sum() / total))


def npmi_coherence(topic_words: list[list[int]] | np.ndarray, reference_counts) -> np.ndarray:
    """NPMI coherence of each topic (Bouma 2009; Lau, Newman & Baldwin 2014), from document co-occurrence.

    For each pair of a topic's top words, ``NPMI = log(P(i, j) / (P(i) P(j))) / -log P(i, j)`` where
    ``P(i)`` is the share of reference documents containing word ``i`` and ``P(i, j)`` the share containing
    both; a pair that never co-occurs scores -1 (the limit), and the topic's coherence is the mean over its
    ``n (n - 1) / 2`` pairs. Takes word indices (e.g. ``top_words(topic_word)``) and the reference corpus
    (usually the training documents).

    Returns
    -------
    numpy.ndarray
        Coherence per topic, in ``[-1, 1]``.
    """
    matrix = _as_sparse(reference_counts, "reference_counts")
    present = (matrix > 0).astype(np.float64).tocsc()
    num_documents = matrix.shape[0]
    coherences = []
    for words in np.asarray(topic_words):
        if len(words) < 2:
            raise ValueError("NPMI needs at least two words per topic")
        occurs = present[:, words].toarray()
        joint = occurs.T @ occurs / num_documents
        marginal = np.diag(joint)
        upper = np.triu_indices(len(words), 1)
        p_joint = joint[upper]
        p_product = marginal[upper[0]] * marginal[upper[1]]
        with np.errstate(divide="ignore", invalid="ignore"):
            pointwise = np.log(p_joint / p_product) / -np.log(p_joint)
        # Never together: NPMI's limit -1. Together in every document (P = 1): the limit +1.
        pointwise = np.where(p_joint == 0, -1.0, np.where(p_joint == 1, 1.0, pointwise))
        coherences.append(pointwise.mean())
    return np.asarray(coherences)
