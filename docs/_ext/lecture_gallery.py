"""The gallery: one page per lecture figure, built from the scripts in ``examples/`` when the docs are built.

The examples are not executed (the VAE and LDA ones take minutes to hours, and CI's budget is for the tests):
each page says what the figure shows and what to look for, gives the command that draws it, and includes the
code that draws it straight from the example (``literalinclude``, so it cannot drift). A figure whose example is
not in ``examples/`` yet (or does not yet contain its marker) gets no page; the gallery's index lists it as
pending, naming the file it will come from, and its page appears on the first build after the example lands.

Pages are written into ``docs/gallery/`` (generated, git-ignored) when the builder starts, and only rewritten
when their text changes. A small pre-rendered image ``docs/_static/gallery/<slug>.png`` (900 px wide, 64
colours: 20-45 kB), when present, is shown, captioned as drawn by the example at its default settings.
Edit :data:`FIGURES` to add or change a page.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snippet:
    """A function or class to show: ``name`` in the first of ``files`` (relative to the repository) defining it."""

    name: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Figure:
    """One gallery page."""

    slug: str
    title: str
    example: str  # the script, relative to the repository
    run: str  # the command line that draws it
    output: str  # what the command writes (a figure, or where the table is printed)
    shows: str
    look_for: str
    snippets: tuple[Snippet, ...] = ()
    marker: str | None = None  # text the example must contain for the page to exist
    cli: str | None = None  # the same with the ppvi command, when there is one
    related: tuple[str, ...] = field(default=())


MODEL_FILES = ("ppvi/models/{}.py", "models/{}.py")  # the model library, before and after its move into ppvi


def _models(name: str) -> tuple[str, ...]:
    return tuple(pattern.format(name) for pattern in MODEL_FILES)


FIGURES: tuple[Figure, ...] = (
    Figure(
        slug="meanfield_vs_fullrank",
        title="Mean-field vs full-rank contours",
        example="examples/compare.py",
        run="python examples/compare.py --output compare.png",
        output="``compare.png`` (marginals and 2-D contours) and the :func:`ppvi.compare` table on stdout",
        shows="A 2-D Gaussian posterior with correlation 0.9 (the exact posterior in black and grey) and the "
        "mean-field and full-rank ADVI fits drawn over it: the 1-D marginals, and the contours of the 30 %, 60 % "
        "and 90 % highest-density regions.",
        look_for="Mean-field gets the means right but its contours are axis-aligned ellipses inside the posterior's: "
        "its sds are those of the conditionals, ``sqrt(1 - 0.9**2) = 0.44`` of the marginal sds (``sd_ratio`` in "
        "the table), and PSIS k-hat flags it. Full-rank lies on top of the reference.",
        snippets=(Snippet("main", ("examples/compare.py",)),),
        cli="ppvi compare MODEL --data FILE --guides meanfield fullrank --reference draws.nc --figure compare.png",
    ),
    Figure(
        slug="elbo_traces",
        title="ELBO traces",
        example="examples/vae.py",
        marker="plot_elbo",
        run="python examples/vae.py --output vae_figures",
        output="``vae_figures/elbo.png``",
        shows="The ELBO per image, step by step (a moving average), of the 2-D and 10-D VAEs on the 8x8 digits, "
        "beside the test log-likelihood of independent Bernoulli pixels.",
        look_for="Whether each curve has flattened out (a trace still rising at the end wants more steps) and "
        "how the two latent sizes compare. :func:`ppvi.fit` stops on its own rule when the trace is stationary; "
        "``fit.elbo`` holds the trace of any fit.",
        snippets=(Snippet("plot_elbo", _models("vae")),),
    ),
    Figure(
        slug="eight_schools_khat",
        title="PSIS k-hat for eight schools",
        example="examples/eight_schools.py",
        run="python examples/eight_schools.py --output-directory eight_schools",
        output="``eight_schools/khat.csv``, also printed",
        shows="PSIS k-hat of mean-field and full-rank ADVI on the eight schools, centred and non-centred, over "
        "several seeds (Yao, Vehtari, Simpson & Gelman 2018, section 4.3).",
        look_for="The centred model is a funnel no Gaussian in (mu, log tau, theta) fits: k-hat above 0.7. The "
        "non-centred one removes the funnel, and its k-hat drops (mean-field about 0.67, \"ok\"). See "
        ":doc:`../user_guide/index` for what to do with a bad k-hat.",
        snippets=(Snippet("khat_table", ("examples/eight_schools.py",)),),
        cli="ppvi fit ppvi.models.eight_schools:centered --data schools.csv --save-fit centred.pt && "
        "ppvi diagnose centred.pt",
    ),
    Figure(
        slug="eight_schools_vsbc",
        title="VSBC histograms for eight schools",
        example="examples/eight_schools.py",
        run="python examples/eight_schools.py --output-directory eight_schools --num-simulations 1000",
        output="``eight_schools/vsbc_<parameterisation>_<guide>.png`` and ``.csv``",
        shows="Histograms of ``p = P_q(theta < theta0)`` over 1,000 simulated data sets, one panel per component, "
        "with the KS test of ``p`` against ``1 - p`` (:func:`ppvi.vsbc`).",
        look_for="For an unbiased fit the histogram is symmetric about 0.5. Mean-field ADVI underestimates tau: its "
        "histogram leans right (mean p above 0.5, q too low) and the KS test flags it.",
        snippets=(Snippet("main", ("examples/eight_schools.py",)),),
        cli="ppvi vsbc ppvi.models.eight_schools:noncentered --data sigma.csv --observed y -M 1000",
    ),
    Figure(
        slug="eight_schools_sbc",
        title="SBC rank ECDFs for eight schools",
        example="examples/eight_schools.py",
        run="python examples/eight_schools.py --output-directory eight_schools",
        output="``eight_schools/sbc_noncentered_meanfield.png``",
        shows="ECDF differences of the SBC ranks (Talts et al. 2018) of the non-centred mean-field fits, with "
        "simultaneous 95 % bands (Säilynoja, Bürkner & Vehtari 2022; :func:`ppvi.sbc`).",
        look_for="A curve leaving its band marks a component whose ranks are not uniform: an S shape is a guide too "
        "wide, an inverted S too narrow, a hump a shifted guide.",
        snippets=(Snippet("main", ("examples/eight_schools.py",)),),
        cli="ppvi sbc ppvi.models.eight_schools:noncentered --data sigma.csv --observed y -M 1000",
    ),
    Figure(
        slug="gmm_em_cavi_svi",
        title="EM vs CAVI vs SVI on the Gaussian mixture",
        example="examples/gmm.py",
        run="python examples/gmm.py --output-directory gmm",
        output="``gmm/gmm_components.png``",
        shows="The lecture's 2-D mixture of two Gaussians, with the components fitted by EM (maximum likelihood), "
        "CAVI (conjugate mean-field VI) and ppvi's SVI (mean-field ADVI, assignments enumerated), and the "
        "responsibilities.",
        look_for="Whether the three methods place the two ellipses alike. EM and CAVI are checked against "
        "scikit-learn's ``GaussianMixture`` and ``BayesianGaussianMixture`` in the tests; SVI needs no "
        "conjugacy, and sums the discrete assignments out exactly.",
        snippets=(Snippet("fit_all", ("examples/gmm.py",)), Snippet("plot_components", ("examples/gmm.py",))),
    ),
    Figure(
        slug="gmm_objectives",
        title="EM, CAVI and SVI objectives, iteration by iteration",
        example="examples/gmm.py",
        run="python examples/gmm.py --output-directory gmm",
        output="``gmm/gmm_traces.png``",
        shows="EM's log-likelihood per point, CAVI's ELBO per point and SVI's Monte Carlo ELBO per point, by "
        "iteration.",
        look_for="EM's and CAVI's objectives cannot decrease (each step maximises a bound). SVI starts from its "
        "Laplace approximation, so its Monte Carlo ELBO is near its final value from the first step. The models "
        "differ (priors; EM has none), so the three need not agree, but all end "
        "close to the log-likelihood per point at the maximum-likelihood estimate: with 1,000 points the priors "
        "weigh little.",
        snippets=(Snippet("plot_traces", ("examples/gmm.py",)),),
    ),
    Figure(
        slug="ppca_posterior",
        title="pPCA: exact vs variational posterior",
        example="examples/ppca.py",
        run="python examples/ppca.py --output-directory ppca",
        output="``ppca/ppca_posterior.png`` and the comparison with the closed forms, printed",
        shows="Probabilistic PCA with fixed loadings, whose posterior over each point's latent coordinates is "
        "Gaussian and known exactly (``models.ppca.posterior``; Tipping & Bishop 1999), against mean-field and "
        "full-rank ADVI fitted by :func:`ppvi.fit` on the latents: the 1- and 2-sd contours for three points, every "
        "mean and sd, and the ELBO traces beside ``log p(x)`` (``models.ppca.log_marginal_likelihood``).",
        look_for="The loadings are nearly parallel, so each posterior is correlated (rho = -0.81). Full-rank lies on "
        "the exact contours and its ELBO on ``log p(x)``. Mean-field has the exact means but the sds of the "
        "conditionals, ``1 / sqrt(Lambda_kk)``, ``sqrt(1 - rho**2) = 0.59`` of the marginal sds, and its ELBO sits "
        "below ``log p(x)`` by its KL, ``-N/2 log(1 - rho**2)`` (Bishop 2006, section 10.1.2).",
        snippets=(Snippet("posterior", _models("ppca")), Snippet("exact", ("examples/ppca.py",))),
    ),
    Figure(
        slug="lda_topics",
        title="LDA and ProdLDA topics",
        example="examples/lda.py",
        run="python examples/lda.py",
        output="top words per topic, held-out perplexity and NPMI coherence, printed",
        shows="Topics of LDA (mean-field Dirichlet guide) and ProdLDA (amortized encoder) on 20 Newsgroups: the top "
        "words of each, held-out perplexity (document completion) and NPMI coherence (Srivastava & Sutton 2017).",
        look_for="Coherence: Srivastava & Sutton (2017) report NPMI of about 0.24 for ProdLDA against 0.11 for "
        "variational LDA, which the example reproduces in kind; and whether the top words of a topic read as one "
        "subject. The corpus is not bundled: ``ppvi datasets list`` says where it is looked for.",
        snippets=(Snippet("main", ("examples/lda.py",)),),
    ),
    Figure(
        slug="vae_samples",
        title="VAE samples",
        example="examples/vae.py",
        marker="plot_samples",
        run="python examples/vae.py --output vae_figures",
        output="``vae_figures/samples.png``",
        shows="Decoder means of draws ``z ~ N(0, I)`` from the prior of a VAE trained on the binarized 8x8 digits.",
        look_for="How many samples read as digits. Blurred ones come from codes that are likely under the prior "
        "but that the encoder seldom uses (the gap between the prior and the aggregate posterior).",
        snippets=(Snippet("plot_samples", _models("vae")),),
    ),
    Figure(
        slug="vae_reconstructions",
        title="VAE reconstructions",
        example="examples/vae.py",
        marker="plot_reconstructions",
        run="python examples/vae.py --output vae_figures",
        output="``vae_figures/reconstructions.png``",
        shows="Test digits (top) and the decoder means at their encodings (bottom).",
        look_for="Whether each reconstruction keeps its digit's identity and stroke. The Bernoulli decoder's mean "
        "is a probability image, so reconstructions are grey where the decoder is unsure.",
        snippets=(Snippet("plot_reconstructions", _models("vae")),),
    ),
    Figure(
        slug="vae_manifold",
        title="The VAE's 2-D latent manifold",
        example="examples/vae.py",
        marker="plot_manifold",
        run="python examples/vae.py --output vae_figures",
        output="``vae_figures/manifold.png`` (and ``latent_means.png``, the test encodings coloured by label)",
        shows="Decoder means over a regular grid of ``z`` in ``[-2, 2]^2`` of the VAE with a 2-D latent space "
        "(Kingma & Welling 2014, figure 4).",
        look_for="Whether neighbouring codes decode to similar images, digits changing gradually across the "
        "grid, and which digits claim which regions (compare the latent means by label).",
        snippets=(Snippet("plot_manifold", _models("vae")), Snippet("plot_latent_means", _models("vae"))),
    ),
    Figure(
        slug="kl_annealing_free_bits",
        title="KL annealing and free bits",
        example="examples/vae_objectives.py",
        marker="free_bits",
        run="python examples/vae_objectives.py --output-directory vae_objectives",
        output="``vae_objectives/kl_per_dimension.png`` and ``vae_objectives/elbo.png``, and the table, printed",
        shows="20-D VAEs on the binarized 8x8 digits trained with the plain ELBO, with linear KL annealing (Bowman "
        "et al. 2016) and with free bits (Kingma et al. 2016) (``kl_warmup_steps`` and ``free_bits`` of "
        ":func:`models.vae.train` and :class:`ppvi.amortized.AmortizedELBO`): the KL of each latent dimension on "
        "the test digits, the activity of each (Burda et al. 2016), and the training objectives step by step.",
        look_for="How many latent dimensions stay active (KL per dimension above zero, activity above 0.01) under "
        "each objective, and what each costs in held-out ELBO (dashed, and in the printed table): with free bits "
        "no dimension falls below lambda.",
        snippets=(Snippet("kl_per_dimension", ("examples/vae_objectives.py",)),
                  Snippet("activity", ("examples/vae_objectives.py",))),
    ),
    Figure(
        slug="bernoulli_vs_gaussian_decoders",
        title="Bernoulli vs Gaussian decoders",
        example="examples/vae_decoders.py",
        marker="gaussian",
        run="python examples/vae_decoders.py --output-directory vae_decoders",
        output="``vae_decoders/reconstructions.png`` and ``vae_decoders/samples.png``, and the held-out scores, "
        "printed",
        shows="The same VAE with a Bernoulli decoder (cross-entropy, on binarized digits) and a Gaussian decoder "
        "(squared error, on grey levels), ``likelihood=\"bernoulli\"`` or ``\"gaussian\"`` of the model library's "
        "VAE: reconstructions of the same test digits, samples from the prior, and each decoder's held-out ELBO.",
        look_for="How the two decoders' means differ: the Bernoulli's is a probability image, grey where it is "
        "unsure; the Gaussian's a grey-level image. Their likelihoods are not comparable in nats: one is a "
        "density on grey levels, the other a probability of binary pixels; the squared error of the "
        "reconstructions against the grey digits is.",
        snippets=(Snippet("train_decoders", ("examples/vae_decoders.py",)),),
    ),
    Figure(
        slug="image_baselines",
        title="The likelihood table of the image baselines",
        example="examples/vae.py",
        marker="baseline_table",
        run="python examples/vae.py --output vae_figures --samples 1000",
        output="the table, printed",
        shows="Test log-likelihood in nats per image of independent Bernoulli pixels, a mixture of Bernoullis, "
        "pPCA and the VAE (importance-sampled with L = 1,000, and its ELBO), on the same binarized test digits.",
        look_for="The nats each model gains over independent pixels. The VAE's importance-sampled estimate is a "
        "tighter bound than its ELBO (Burda et al. 2016), and their gap measures how far its guide is from the "
        "posterior.",
        snippets=(Snippet("baseline_table", _models("image_baselines")),),
    ),
    Figure(
        slug="learning_to_draw",
        title="Learning to draw MNIST",
        example="examples/learning_to_draw.py",
        run="python examples/learning_to_draw.py --output learning_to_draw --dataset mnist",
        output="``learning_to_draw/samples.png`` (64 samples from every model, side by side) and "
        "``learning_to_draw/table.csv``; ``--dataset digits`` (the default) runs on the 8x8 digits, ``--quick`` at "
        "small settings",
        shows="The lecture's ladder of generative models fitted to the same binary images: independent Bernoulli "
        "pixels, naive Bayes, a mixture of Bernoullis, a fully visible sigmoid belief network, pPCA, the VAE, "
        "PixelCNN and PixelRNN, with 64 samples from each and the table of test negative log-likelihoods (nats "
        "per image; pPCA's and the VAE's are bounds) and the seconds each takes to draw 64 images.",
        look_for="How the samples go from noise to digits up the ladder, what each rung gains in nats, and what "
        "the autoregressive models pay for it in drawing time: one decoder pass for the VAE, ``H * W`` "
        "sequential network passes for PixelCNN and PixelRNN.",
        snippets=(
            Snippet("main", ("examples/learning_to_draw.py",)), Snippet("fit_ladder", _models("image_baselines")),
        ),
    ),
)


def _defines(path: Path, name: str) -> bool:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return False
    return any(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name
        for node in tree.body
    )


def _available(figure: Figure, root: Path) -> bool:
    path = root / figure.example
    if not path.is_file():
        return False
    return figure.marker is None or figure.marker in path.read_text(encoding="utf-8")


def _indent(text: str, spaces: int = 3) -> str:
    return "\n".join(" " * spaces + line if line else "" for line in text.splitlines())


def page(figure: Figure, root: Path, docs: Path) -> str:
    """The reStructuredText of ``figure``'s page (``docs/gallery/<slug>.rst``)."""
    up = "../../"  # from docs/gallery/ to the repository
    lines = [f".. _gallery-{figure.slug}:", "", figure.title, "=" * len(figure.title), "", figure.shows, ""]
    image = docs / "_static" / "gallery" / f"{figure.slug}.png"
    if image.is_file():
        lines += [f".. figure:: ../_static/gallery/{figure.slug}.png", f"   :alt: {figure.title}", "",
                  "   Drawn by the example at its default settings (pre-rendered, not drawn by the docs build).", ""]
    lines += [f"**What to look for.** {figure.look_for}", "", "Draw it", "-------", "",
              f"From the repository root (the example is ``{figure.example}``; writes {figure.output}):", "",
              ".. code-block:: bash", "", _indent(figure.run), ""]
    if figure.cli:
        lines += ["With the ``ppvi`` command (:doc:`../cli`):", "", ".. code-block:: bash", "", _indent(figure.cli), ""]
    code = []
    for snippet in figure.snippets:
        source = next((f for f in snippet.files if _defines(root / f, snippet.name)), None)
        if source is not None:  # a function that moved or was renamed is left out, not a broken include
            code += [f"``{snippet.name}`` in ``{source}``:", "", f".. literalinclude:: {up}{source}",
                     "   :language: python", f"   :pyobject: {snippet.name}", ""]
    if code:
        lines += ["The code that draws it", "----------------------", "", *code]
    lines += ["The whole example", "-----------------", "", f".. literalinclude:: {up}{figure.example}",
              "   :language: python", "   :linenos:", ""]
    return "\n".join(lines)


def index(available: list[Figure], pending: list[Figure]) -> str:
    """The gallery's front page: the pages, and the figures still waiting for their example."""
    lines = [
        ".. _gallery:", "", "Gallery", "=======", "",
        "One page per lecture figure, each built from a script in ``examples/``: what the figure shows, what to "
        "look for, the command that draws it and the code that does. The documentation build does not run the "
        "examples (several train for minutes); run the command on a page to draw its figure.", "",
        ".. toctree::", "   :maxdepth: 1", "",
    ]
    lines += [f"   {figure.slug}" for figure in available]
    lines.append("")
    if pending:
        lines += ["Figures whose example is not in ``examples/`` yet (their pages appear when it is):", ""]
        lines += [f"- {figure.title} (``{figure.example}``)" for figure in pending]
        lines.append("")
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def generate(app: Sphinx) -> None:
    docs = Path(app.srcdir)
    root = docs.parent
    folder = docs / "gallery"
    folder.mkdir(exist_ok=True)
    available = [figure for figure in FIGURES if _available(figure, root)]
    pending = [figure for figure in FIGURES if figure not in available]
    keep = {"index.rst"} | {f"{figure.slug}.rst" for figure in available}
    for stale in folder.glob("*.rst"):
        if stale.name not in keep:
            stale.unlink()
    for figure in available:
        _write(folder / f"{figure.slug}.rst", page(figure, root, docs))
    _write(folder / "index.rst", index(available, pending))
    logger.info(f"gallery: {len(available)} pages, {len(pending)} figures waiting for their example")


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", generate)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
