"""Tests of ppvi.data: digits against scikit-learn, MNIST from IDX files and npz the tests write (headers built here
from the IDX spec, checksums from hashlib), the download path through a fake URL opener (no network), corpora from
tiny files in each format, and the real shared data against the figures in its provenance notes."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.sparse
from sklearn.datasets import load_digits

from ppvi import data

# --- helpers ----------------------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """An IDX file built from the spec: 0, 0, type code, number of dimensions, big-endian int32 sizes, data."""
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def md5(content: bytes) -> str:
    return hashlib.md5(content).hexdigest()


NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@pytest.fixture
def tiny_mnist() -> dict[str, np.ndarray]:
    generator = np.random.default_rng(1)
    return {
        "train_images": generator.integers(0, 256, size=(5, 4, 3), dtype=np.uint8),
        "train_labels": generator.integers(0, 10, size=5, dtype=np.uint8),
        "test_images": generator.integers(0, 256, size=(2, 4, 3), dtype=np.uint8),
        "test_labels": generator.integers(0, 10, size=2, dtype=np.uint8),
    }


def write_mnist(directory: Path, arrays: dict[str, np.ndarray], compress: bool) -> dict[str, bytes]:
    """Write the four files under their official names; return each file's bytes by name."""
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for field, name in NAMES.items():
        content = idx_bytes(arrays[field])
        if compress:
            content, name = gzip.compress(content), name + ".gz"
        (directory / name).write_bytes(content)
        written[name] = content
    return written


def assert_matches(images: data.ImageData, arrays: dict[str, np.ndarray]) -> None:
    for field in ("train_images", "test_images"):
        assert getattr(images, field).dtype == np.float32
        np.testing.assert_array_equal(getattr(images, field), arrays[field].astype(np.float32) / 255)
    for field in ("train_labels", "test_labels"):
        assert getattr(images, field).dtype == np.int64
        np.testing.assert_array_equal(getattr(images, field), arrays[field])
    assert images.image_shape == arrays["train_images"].shape[1:]


# --- digits -----------------------------------------------------------------------------------------------------------


def test_digits_is_sklearn_digits_scaled_and_stratified():
    reference = load_digits()
    split = data.digits(test_fraction=0.25, seed=3)
    assert split.train_images.shape[1:] == (8, 8) and split.image_shape == (8, 8)
    assert len(split.train_images) + len(split.test_images) == 1797
    assert len(split.test_images) == int(np.ceil(0.25 * 1797))  # scikit-learn rounds the test size up
    images = np.concatenate([split.train_images, split.test_images])
    labels = np.concatenate([split.train_labels, split.test_labels])
    assert images.dtype == np.float32 and labels.dtype == np.int64
    assert images.min() == 0.0 and images.max() == 1.0
    # Every (image, label) pair is one of scikit-learn's, each used once (k / 16 is exact in float32).
    reference_pairs = sorted(
        (image.astype(np.int64).tobytes(), int(label))
        for image, label in zip(reference.images, reference.target, strict=True)
    )
    our_pairs = sorted(
        ((image * 16).astype(np.int64).tobytes(), int(label)) for image, label in zip(images, labels, strict=True)
    )
    assert our_pairs == reference_pairs
    # Stratified: each digit's share of the test split is its share of the whole set, to within one image.
    whole = np.bincount(reference.target, minlength=10) * 0.25
    assert np.abs(np.bincount(split.test_labels, minlength=10) - whole).max() <= 1


def test_digits_seed_changes_the_split_and_bad_fraction_raises():
    first, second = data.digits(seed=0), data.digits(seed=1)
    assert not np.array_equal(first.test_labels, second.test_labels)
    np.testing.assert_array_equal(first.test_images, data.digits(seed=0).test_images)
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction must lie strictly between 0 and 1"):
            data.digits(test_fraction=fraction)


# --- IDX parsing -----------------------------------------------------------------------------------------------------


def test_parse_idx_reads_big_endian_types():
    values = np.array([[1, -2, 300000], [4, 5, -6]], dtype=np.int32)
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(values, 0x0C)), values)
    floats = np.array([0.5, -1.25], dtype=np.float32)
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(floats, 0x0D)), floats)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00", "is not an IDX file"),
        (b"", "is not an IDX file"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x00", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated or empty"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x00\x00", r"declares shape \(3,\).*holds 2"),
    ],
)
def test_parse_idx_rejects_corrupt_headers(content, message):
    with pytest.raises(ValueError, match=message):
        data.parse_idx(content, source="broken-file")


# --- mnist from files -------------------------------------------------------------------------------------------------


def test_mnist_reads_raw_idx_files(tmp_path, tiny_mnist):
    write_mnist(tmp_path, tiny_mnist, compress=False)
    assert_matches(data.mnist(tmp_path, cache_dir=tmp_path / "cache"), tiny_mnist)


def test_mnist_reads_gz_idx_files_and_checks_official_names(tmp_path, tiny_mnist):
    written = write_mnist(tmp_path, tiny_mnist, compress=True)
    assert_matches(data.mnist(tmp_path, cache_dir=tmp_path / "cache", verify=False), tiny_mnist)
    # Under the official names, these files are not the official ones: the checksum check catches it.
    with pytest.raises(ValueError, match="checksum mismatch") as raised:
        data.mnist(tmp_path, cache_dir=tmp_path / "cache")
    message = str(raised.value)
    name = next(name for name in written if name in message)
    assert md5(written[name]) in message
    assert dict(data.MNIST_FILES.values())[name[: -len(".gz")]] in message
    assert "download" in message


def test_mnist_reports_corrupt_header_and_gzip(tmp_path, tiny_mnist):
    write_mnist(tmp_path, tiny_mnist, compress=False)
    path = tmp_path / NAMES["test_images"]
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated or corrupt") as raised:
        data.mnist(tmp_path, cache_dir=tmp_path / "cache")
    assert str(path) in str(raised.value)
    broken = tmp_path / "broken-idx.gz"
    broken.write_bytes(gzip.compress(idx_bytes(tiny_mnist["train_labels"]))[:-5])
    with pytest.raises(ValueError, match="not a valid gzip file"):
        data.read_idx(broken)


def test_mnist_rejects_mismatched_images_and_labels(tmp_path, tiny_mnist):
    tiny_mnist["train_labels"] = tiny_mnist["train_labels"][:4]
    write_mnist(tmp_path, tiny_mnist, compress=False)
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        data.mnist(tmp_path, cache_dir=tmp_path / "cache")


def test_mnist_reads_keras_npz_from_a_directory_or_a_path(tmp_path, tiny_mnist):
    arrays = {
        "x_train": tiny_mnist["train_images"],
        "y_train": tiny_mnist["train_labels"],
        "x_test": tiny_mnist["test_images"],
        "y_test": tiny_mnist["test_labels"],
    }
    np.savez(tmp_path / "mnist.npz", **arrays)
    assert_matches(data.mnist(tmp_path, cache_dir=tmp_path / "cache"), tiny_mnist)
    assert_matches(data.mnist(tmp_path / "mnist.npz"), tiny_mnist)
    np.savez(tmp_path / "other.npz", x_train=arrays["x_train"])
    with pytest.raises(ValueError, match=r"lacks the arrays \['y_train', 'x_test', 'y_test'\]"):
        data.mnist(tmp_path / "other.npz")


def test_mnist_missing_says_what_and_where_and_never_downloads(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("mnist() opened a URL without download=True")

    monkeypatch.setattr(data, "urlopen", no_network)
    monkeypatch.setenv("PPVI_DATA", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as raised:
        data.mnist(tmp_path)
    message = str(raised.value)
    for expected in (str(tmp_path / "home" / "mnist"), "train-images-idx3-ubyte", "mnist.npz", "download=True"):
        assert expected in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.mnist(tmp_path / "nowhere")


def test_mnist_default_location_respects_ppvi_data(tmp_path, monkeypatch, tiny_mnist):
    monkeypatch.setenv("PPVI_DATA", str(tmp_path))
    write_mnist(tmp_path / "mnist", tiny_mnist, compress=False)
    assert_matches(data.mnist(), tiny_mnist)


# --- download (fake URL opener, no network) ---------------------------------------------------------------------------


class FakeMirrors:
    """Stands in for urllib's urlopen: serves ``files`` from the mirror ``serving``, refuses the others."""

    def __init__(self, files: dict[str, bytes], serving: str):
        self.files, self.serving, self.requests = files, serving, []

    def __call__(self, url: str, timeout: float):
        self.requests.append(url)
        if not url.startswith(self.serving):
            raise URLError("connection refused")
        return io.BytesIO(self.files[url[len(self.serving) :]])


def test_download_falls_back_to_the_next_mirror_and_verifies(tmp_path, monkeypatch, tiny_mnist):
    served = write_mnist(tmp_path / "server", tiny_mnist, compress=True)
    monkeypatch.setattr(
        data, "MNIST_FILES", {field: (name, md5(served[name + ".gz"])) for field, name in NAMES.items()}
    )
    mirrors = ("https://first.example/", "https://second.example/")
    fake = FakeMirrors(served, serving=mirrors[1])
    monkeypatch.setattr(data, "urlopen", fake)
    cache = tmp_path / "cache"
    assert_matches(data.mnist(download=True, cache_dir=cache, mirrors=mirrors), tiny_mnist)
    assert sorted(path.name for path in cache.iterdir()) == sorted(served)
    assert fake.requests == [mirror + name for name in (n + ".gz" for n in NAMES.values()) for mirror in mirrors]
    # Once cached, nothing is fetched again.
    fake.requests.clear()
    assert_matches(data.mnist(download=True, cache_dir=cache, mirrors=mirrors), tiny_mnist)
    assert fake.requests == []


def test_download_checksum_failure_saves_nothing(tmp_path, monkeypatch, tiny_mnist):
    served = write_mnist(tmp_path / "server", tiny_mnist, compress=True)
    monkeypatch.setattr(
        data, "MNIST_FILES", {field: (name, md5(served[name + ".gz"])) for field, name in NAMES.items()}
    )
    tampered = dict(served)
    name = NAMES["train_images"] + ".gz"
    tampered[name] = served[name][:-1] + bytes([served[name][-1] ^ 1])
    monkeypatch.setattr(data, "urlopen", FakeMirrors(tampered, serving="https://only.example/"))
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=f"checksum mismatch downloading {name}") as raised:
        data.mnist(download=True, cache_dir=cache, mirrors=("https://only.example/",))
    assert md5(tampered[name]) in str(raised.value) and md5(served[name]) in str(raised.value)
    leftovers = [path.name for path in cache.iterdir()] if cache.exists() else []
    assert name not in leftovers and not any(left.startswith(".") for left in leftovers)


def test_download_with_every_mirror_down_raises_connection_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "urlopen", FakeMirrors({}, serving="https://none.example/"))
    with pytest.raises(ConnectionError, match="could not download train-images-idx3-ubyte.gz") as raised:
        data.mnist(download=True, cache_dir=tmp_path, mirrors=("https://a.example/", "https://b.example/"))
    assert "https://a.example/train-images-idx3-ubyte.gz" in str(raised.value)


# --- binarization -----------------------------------------------------------------------------------------------------


def test_binarize_draws_bernoulli_of_the_intensity():
    images = np.tile(np.array([0.0, 0.3, 0.9, 1.0], dtype=np.float32), (50_000, 1))
    draws = data.binarize(images, seed=5)
    assert draws.dtype == np.float32 and draws.shape == images.shape
    assert set(np.unique(draws)) <= {0.0, 1.0}
    assert draws[:, 0].max() == 0.0 and draws[:, 3].min() == 1.0
    for column, probability in ((1, 0.3), (2, 0.9)):
        standard_error = np.sqrt(probability * (1 - probability) / len(images))
        assert abs(draws[:, column].mean() - probability) < 5 * standard_error
    np.testing.assert_array_equal(draws, data.binarize(images, seed=5))
    assert not np.array_equal(draws, data.binarize(images, seed=6))
    with pytest.raises(ValueError, match=r"intensities in \[0, 1\].*1/255"):
        data.binarize(np.array([0.0, 255.0]))


def test_binarized_mnist_from_a_written_npz(tmp_path):
    generator = np.random.default_rng(2)
    splits = {
        key: generator.integers(0, 2, size=(n, 784), dtype=np.uint8)
        for key, n in (("train", 6), ("valid", 3), ("test", 4))
    }
    np.savez(tmp_path / "binarized_mnist.npz", **splits)
    loaded = data.binarized_mnist(tmp_path)
    assert loaded.train_labels is None and loaded.test_labels is None
    np.testing.assert_array_equal(loaded.train_images, splits["train"].reshape(6, 28, 28))
    np.testing.assert_array_equal(loaded.test_images, splits["test"].reshape(4, 28, 28))
    assert loaded.train_images.dtype == np.float32 and loaded.image_shape == (28, 28)
    joined = data.binarized_mnist(tmp_path / "binarized_mnist.npz", include_validation=True)
    np.testing.assert_array_equal(joined.train_images[6:], splits["valid"].reshape(3, 28, 28))
    np.savez(tmp_path / "bad.npz", train=splits["train"] * 3, valid=splits["valid"], test=splits["test"])
    with pytest.raises(ValueError, match="split 'train' should be n x 784 zeros and ones"):
        data.binarized_mnist(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="Larochelle & Murray"):
        data.binarized_mnist(tmp_path / "missing.npz")


# --- corpora from tiny files ------------------------------------------------------------------------------------------

# Four documents over five words; the third is empty.
COUNTS = np.array([[2, 0, 1, 0, 0], [0, 3, 0, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]


def sparse_lines(counts: np.ndarray, first_id: int, leading: str) -> str:
    lines = []
    for row in counts:
        pairs = [f"{index + first_id}:{count}" for index, count in enumerate(row) if count]
        lines.append(" ".join([leading if leading != "N" else str(len(pairs)), *pairs]))
    return "\n".join(lines) + "\n"


def assert_corpus(loaded: data.Corpus, train: np.ndarray, test: np.ndarray | None) -> None:
    assert loaded.vocabulary == WORDS
    assert isinstance(loaded.train, scipy.sparse.csr_matrix) and loaded.train.dtype == np.int64
    np.testing.assert_array_equal(loaded.train.toarray(), train)
    if test is None:
        assert loaded.test is None
    else:
        np.testing.assert_array_equal(loaded.test.toarray(), test)


def test_corpus_nvdm_format(tmp_path):
    # NVDM: 1-based ids, a placeholder "1" label, vocab.new with a count after each word; a trailing empty doc.
    (tmp_path / "train.feat").write_text(sparse_lines(COUNTS, 1, "1") + "1 \n")
    (tmp_path / "test.feat").write_text(sparse_lines(COUNTS[::-1], 1, "1"))
    (tmp_path / "vocab.new").write_text("".join(f"{word} {index}\n" for index, word in enumerate(WORDS)))
    non_empty = COUNTS[[0, 1, 3]]
    assert_corpus(data.corpus(tmp_path), non_empty, non_empty[::-1])
    kept = data.corpus(tmp_path, min_document_length=0)
    assert kept.train.shape == (5, 5) and kept.test.shape == (4, 5)
    assert_corpus(data.corpus(tmp_path, min_document_length=5), COUNTS[[3]], COUNTS[[3]])


def test_corpus_lda_c_format(tmp_path):
    (tmp_path / "tiny.dat").write_text(sparse_lines(COUNTS, 0, "N"))
    (tmp_path / "vocab.txt").write_text("".join(f"{word} \n" for word in WORDS))
    assert_corpus(data.corpus(str(tmp_path)), COUNTS[[0, 1, 3]], None)


def test_corpus_npz_format(tmp_path):
    scipy.sparse.save_npz(tmp_path / "train_counts.npz", scipy.sparse.csr_matrix(COUNTS.astype(np.int32)))
    scipy.sparse.save_npz(tmp_path / "test_counts.npz", scipy.sparse.csr_matrix(COUNTS[:2].astype(np.int32)))
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    assert_corpus(data.corpus(tmp_path), COUNTS[[0, 1, 3]], COUNTS[:2])
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS[:4]) + "\n")
    with pytest.raises(ValueError, match="vocabulary has 4 words"):
        data.corpus(tmp_path)


def test_parsers_sum_repeated_words_and_accept_empty_input():
    np.testing.assert_array_equal(data.parse_nvdm("1 1:1 1:2 2:1\n\n1 2:4\n", 2).toarray(), [[3, 1], [0, 4]])
    assert data.parse_lda_c("", 3).shape == (0, 3)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("3 0:1 2:1", "declares 3 distinct words but lists 2"),
        ("1 7:1", "word id out of range"),
        ("1 0:x", "cannot parse"),
    ],
)
def test_corpus_corrupt_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / "tiny.dat").write_text(f"1 0:1\n{line}\n")
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    with pytest.raises(ValueError, match=message) as raised:
        data.corpus(tmp_path)
    assert f"{tmp_path / 'tiny.dat'}, line 2" in str(raised.value)


def test_corpus_missing_and_wrong_names(tmp_path, monkeypatch):
    monkeypatch.setenv("PPVI_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as raised:
        data.corpus("20news")
    message = str(raised.value)
    for expected in (str(tmp_path / "20news"), "train_counts.npz", "train.feat", "vocab.new", "ysmiao/nvdm"):
        assert expected in message
    with pytest.raises(FileNotFoundError, match="lda-c"):
        data.corpus("ap", root=tmp_path)
    with pytest.raises(ValueError, match="unknown corpus 'reuters'"):
        data.corpus("reuters")


def test_named_corpus_checks_the_original_files(tmp_path):
    # Under a named source the original lda-c files must be the published ones.
    (tmp_path / "ap.dat").write_text(sparse_lines(COUNTS, 0, "N"))
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    with pytest.raises(ValueError, match="checksum mismatch") as raised:
        data.corpus("ap", root=tmp_path)
    message = str(raised.value)
    assert str(tmp_path / "vocab.txt") in message and "3d23b2911c44bd36433735ccb0dc9671" in message


# --- the real shared data ---------------------------------------------------------------------------------------------


def test_shared_mnist_matches_its_provenance(shared):
    mnist = data.mnist(shared / "data" / "mnist_idx", cache_dir=shared / "no-cache")
    assert mnist.train_images.shape == (60_000, 28, 28) and mnist.test_images.shape == (10_000, 28, 28)
    assert mnist.train_labels.shape == (60_000,) and mnist.test_labels.shape == (10_000,)
    # Mean of the 8-bit training pixels / 255, from PROVENANCE_mnist.md; float32 rounding of each pixel only.
    assert mnist.train_images.mean(dtype=np.float64) == pytest.approx(0.1306604762738429, rel=1e-7)
    assert set(np.unique(mnist.test_labels)) == set(range(10))


def test_download_of_the_real_files_passes_the_official_checksums(shared, tmp_path, monkeypatch):
    served = {path.name: path.read_bytes() for path in (shared / "data" / "mnist_idx").glob("*.gz")}
    monkeypatch.setattr(data, "urlopen", FakeMirrors(served, serving=data.MNIST_MIRRORS[0]))
    mnist = data.mnist(download=True, cache_dir=tmp_path)
    assert mnist.train_images.shape == (60_000, 28, 28)
    assert {md5((tmp_path / name).read_bytes()) for name in served} == {md5 for _, md5 in data.MNIST_FILES.values()}


def test_shared_binarized_mnist(shared):
    loaded = data.binarized_mnist(shared / "data" / "binarized_mnist" / "binarized_mnist.npz")
    assert loaded.train_images.shape == (50_000, 28, 28) and loaded.test_images.shape == (10_000, 28, 28)
    assert set(np.unique(loaded.train_images)) == {0.0, 1.0}


def test_shared_20news_npz_and_nvdm_originals_agree(shared):
    root = shared / "data" / "20news_nvdm_prodlda"
    news = data.corpus("20news", root=root)
    # Figures from PROVENANCE_corpus.md.
    assert news.train.shape == (11_258, 1_995) and news.train.sum() == 991_493
    assert news.test.shape == (7_487, 1_995) and news.test.sum() == 629_312
    assert len(news.vocabulary) == 1_995 and news.vocabulary[0] == "_eos_"
    original = data.corpus("20news", root=root / "original")
    assert (original.train != news.train).nnz == 0 and (original.test != news.test).nnz == 0
    assert original.vocabulary == news.vocabulary


def test_shared_ap_npz_and_lda_c_originals_agree(shared):
    root = shared / "data" / "ap_blei"
    ap = data.corpus("ap", root=root)
    # Figures from PROVENANCE_corpus.md: the known AssociatedPress document-term matrix.
    assert ap.train.shape == (2_246, 10_473) and ap.train.nnz == 302_031 and ap.train.sum() == 435_838
    assert ap.test is None
    original = data.corpus("ap", root=root / "original")
    assert (original.train != ap.train).nnz == 0 and original.vocabulary == ap.vocabulary
