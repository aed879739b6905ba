"""examples/lda.py runs end to end with tiny settings, on a small corpus drawn from known topics and written in the
layout of the real one (``train_counts.npz``, ``test_counts.npz``, ``vocab.txt``), so it takes seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse

from examples import load_example
from ppvi.models import lda

NUM_TOPICS, VOCABULARY_SIZE = 3, 40
BETTER_THAN_UNIFORM = {"LDA": 0.6, "ProdLDA": 0.95}




def write_corpus(directory: Path) -> list[str]:
    """300 documents of 60 tokens from 3 sparse topics over 40 words; the first 200 train, the rest test."""
    counts, _, _ = lda.simulate(300, VOCABULARY_SIZE, NUM_TOPICS, 60, seed=2)
    vocabulary = [f"word{index:02d}" for index in range(VOCABULARY_SIZE)]
    scipy.sparse.save_npz(directory / "train_counts.npz", scipy.sparse.csr_matrix(counts[:200]))
    scipy.sparse.save_npz(directory / "test_counts.npz", scipy.sparse.csr_matrix(counts[200:]))
    (directory / "vocab.txt").write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    return vocabulary


def test_lda_example_prints_top_words_for_both_methods(tmp_path, capsys):
    vocabulary = write_corpus(tmp_path)
    results = load_example("lda").main(
        tmp_path, num_topics=NUM_TOPICS, lda_epochs=30, prodlda_epochs=100, shown_topics=3
    )
    printed = capsys.readouterr().out
    assert set(results) == {"LDA", "ProdLDA"}
    for name, result in results.items():
        assert name in printed
        assert len(result["top_words"]) == NUM_TOPICS and all(len(words) == 10 for words in result["top_words"])
        assert all(set(words) <= set(vocabulary) and len(set(words)) == 10 for words in result["top_words"])
        assert result["top_words"][0][0] in printed
        assert -1.0 <= result["npmi"] <= 1.0
        # A model that learnt nothing predicts held-out words no better than the uniform distribution (perplexity
        # = vocabulary size). LDA gets far below it on these sparse topics (eta = 0.1; measured 18 of 40); ProdLDA,
        # with its real-corpus defaults (batch normalisation, dropout, learning rate 0.002) and 100 steps, only
        # starts to (measured 34): the accuracy checks are in tests/models/test_lda.py.
        assert 1.0 < result["perplexity"] < BETTER_THAN_UNIFORM[name] * VOCABULARY_SIZE, (name, result["perplexity"])
    assert np.isfinite([result["npmi"] for result in results.values()]).all()
