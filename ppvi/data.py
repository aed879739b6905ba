"""Datasets for the examples and benchmarks: images for VAEs, document-term matrices for topic models.

- :func:`digits`: scikit-learn's bundled 8x8 digits (no network, the default everywhere).
- :func:`mnist`: MNIST from the four IDX files (gz or raw) or a Keras-layout ``mnist.npz``; downloads from the
  official mirrors only when asked (``download=True``), verifying the published MD5s.
- :func:`binarized_mnist`: the static binarization of Larochelle & Murray (2011); :func:`binarize`: dynamic
  binarization (fresh Bernoulli draws).
- :func:`corpus`: 20 Newsgroups as prepared by NVDM / ProdLDA, or Blei's AP corpus, as sparse counts.

Nothing here downloads unless ``download=True`` is passed. Data lives in ``$PPVI_DATA/<name>`` when the
environment variable ``PPVI_DATA`` is set, else ``~/.cache/ppvi/<name>``.

The parsers (:func:`parse_idx`, :func:`parse_nvdm`, :func:`parse_lda_c`, :func:`drop_short_documents`) are pure
functions on bytes and arrays; the loaders around them only find files, check them and report what is missing.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.error import URLError
from urllib.request import urlopen

import numpy as np

if TYPE_CHECKING:  # imported where a corpus is read: scipy.sparse costs a tenth of a second at start-up
    import scipy.sparse

__all__ = [
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "Corpus",
    "ImageData",
    "binarize",
    "binarized_mnist",
    "corpus",
    "data_directory",
    "digits",
    "drop_short_documents",
    "mnist",
    "parse_idx",
    "parse_lda_c",
    "parse_nvdm",
    "read_idx",
]


class ImageData(NamedTuple):
    """Images with pixels in [0, 1] and their labels, split into train and test.

    ``train_images`` and ``test_images`` are float32 arrays of shape ``(n, height, width)``; the labels are
    int64 arrays of shape ``(n,)``, or ``None`` for label-less sets (:func:`binarized_mnist`).
    """

    train_images: np.ndarray
    train_labels: np.ndarray | None
    test_images: np.ndarray
    test_labels: np.ndarray | None

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(height, width)`` of one image."""
        height, width = self.train_images.shape[1:]
        return int(height), int(width)


class Corpus(NamedTuple):
    """A bag-of-words corpus: document-term count matrices (int64 CSR, documents x vocabulary) and the words.

    Column ``j`` of ``train`` and ``test`` counts ``vocabulary[j]``; ``test`` is ``None`` when the corpus has no
    held-out split (AP).
    """

    train: scipy.sparse.csr_matrix
    test: scipy.sparse.csr_matrix | None
    vocabulary: list[str]


def data_directory(name: str) -> Path:
    """Where dataset ``name`` is looked for and downloaded to: ``$PPVI_DATA/<name>``, else ``~/.cache/ppvi/<name>``."""
    base = os.environ.get("PPVI_DATA")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "ppvi") / name


# --------------------------------------------------------------------------------------------------------------
# digits


def digits(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, UCI optdigits test set), split in two.

    Pixels (counts 0..16 of the 4x4 blocks of the original 32x32 bitmaps) are divided by 16 so they lie in
    [0, 1]. The split is stratified by label, so both halves hold every digit in the same proportions.

    Parameters
    ----------
    test_fraction
        Share of the images put in the test split, strictly between 0 and 1.
    seed
        Seed of the shuffle before the split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    bunch = load_digits()
    # load_digits pixels are counts of set bits in 4x4 blocks: integers 0..16.
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return ImageData(train_images, train_labels, test_images, test_labels)


# --------------------------------------------------------------------------------------------------------------
# MNIST

#: The four MNIST files: field of :class:`ImageData` -> (file name without ``.gz``, MD5 of the official ``.gz``).
#: The MD5s are those of the files LeCun published (torchvision's list; PROVENANCE_mnist.md in the shared data).
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train_images": ("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c"),
}

#: Official mirrors, tried in order (torchvision's list: PyTorch's S3 copy, then LeCun's site).
MNIST_MIRRORS: tuple[str, ...] = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")

#: IDX element type codes (third byte of the magic number) -> big-endian numpy dtype, from the IDX format spec
#: on LeCun's MNIST page.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

#: Seconds to wait for a mirror to answer before trying the next one.
_DOWNLOAD_TIMEOUT = 60.0

_MNIST_HELP = (
    "pass root= a directory holding the four IDX files ({names}, each raw or .gz) or a Keras-layout mnist.npz "
    "(or the path of such an npz), or call ppvi.data.mnist(download=True) to fetch the .gz files from "
    "{mirrors} into {cache}"
)


def parse_idx(content: bytes, source: str = "IDX data") -> np.ndarray:
    """Decode an (uncompressed) IDX file: the array format of the MNIST distribution.

    Layout (LeCun, Cortes & Burges, "The MNIST database", file-format section): two zero bytes, a type code, the
    number of dimensions ``d``, then ``d`` big-endian int32 sizes and the data in C order.

    Parameters
    ----------
    content
        The file's bytes, already decompressed.
    source
        Name of the file for error messages.

    Returns
    -------
    The array, in native byte order.
    """
    if len(content) < 4 or content[0] != 0 or content[1] != 0:
        raise ValueError(
            f"{source} is not an IDX file (its first bytes {content[:4].hex() or 'are missing'}, expected 0000 then "
            "a type code and the number of dimensions): the file is corrupt or not MNIST; delete it and fetch it again"
        )
    type_code, dimensions = content[2], content[3]
    if type_code not in _IDX_TYPES:
        raise ValueError(
            f"{source} has an unknown IDX type code 0x{type_code:02x} (known: "
            f"{', '.join(f'0x{code:02x}' for code in _IDX_TYPES)}): the file is corrupt; delete it and fetch it again"
        )
    header_length = 4 + 4 * dimensions
    if dimensions == 0 or len(content) < header_length:
        raise ValueError(f"{source}: IDX header declares {dimensions} dimensions but is truncated or empty: corrupt")
    shape = tuple(int(size) for size in np.frombuffer(content, dtype=">i4", count=dimensions, offset=4))
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    actual = len(content) - header_length
    if actual != expected:
        raise ValueError(
            f"{source}: IDX header declares shape {shape} ({expected:,} data bytes) but the file holds {actual:,}: "
            "it is truncated or corrupt; delete it and fetch it again"
        )
    array = np.frombuffer(content, dtype=dtype, offset=header_length).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _md5(content: bytes) -> str:
    return hashlib.md5(content, usedforsecurity=False).hexdigest()


def read_idx(path: str | Path, expected_md5: str | None = None) -> np.ndarray:
    """Read an IDX file, gzip-compressed (name ending ``.gz``) or raw, optionally checking the file's MD5 first.

    Raises
    ------
    ValueError
        The MD5 differs from ``expected_md5``, the gzip stream is broken, or the IDX header is corrupt; the
        message names the file and says what to do.
    """
    path = Path(path)
    content = path.read_bytes()
    if expected_md5 is not None:
        actual = _md5(content)
        if actual != expected_md5:
            raise ValueError(
                f"checksum mismatch for {path}: MD5 {actual}, expected {expected_md5} (the official file): it is "
                "corrupt or a different file; delete it and download it again (ppvi.data.mnist(download=True)), "
                "or pass verify=False if you deliberately use a modified copy"
            )
    if path.name.endswith(".gz"):
        try:
            content = gzip.decompress(content)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(
                f"{path} is not a valid gzip file ({error}): it is corrupt or truncated; delete it and fetch it again"
            ) from error
    return parse_idx(content, source=str(path))


def _find_idx(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _images_and_labels(images: np.ndarray, labels: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Check an MNIST image/label pair and scale the 8-bit pixels to float32 in [0, 1]."""
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(
            f"{source}: expected images of shape (n, height, width) and labels of shape (n,), got "
            f"{images.shape} and {labels.shape}: are the image and label files swapped or corrupt?"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{source}: {images.shape[0]} images but {labels.shape[0]} labels: a file is corrupt")
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: MNIST pixels should be 8-bit unsigned integers, got {images.dtype}")
    # 8-bit greyscale: 255 is full intensity.
    return (images / np.float32(255.0)).astype(np.float32), labels.astype(np.int64)


#: What reading a damaged npz raises: a truncated zip (``BadZipFile``, ``EOFError``), a damaged member (``zlib``),
#: or bytes that are no npz at all (NumPy's ``ValueError``: "pickled data" or "failed to interpret").
_CORRUPT_NPZ_ERRORS = (OSError, EOFError, ValueError, KeyError, zlib.error, zipfile.BadZipFile)


def _read_npz(path: Path, keys: tuple[str, ...], layout: str, fix: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of the npz at ``path``; a damaged file or another layout raises ``ValueError`` naming
    the file and what to do (``fix``)."""

    def corrupt(error: Exception) -> ValueError:
        return ValueError(
            f"{path} is not a readable npz file ({type(error).__name__}: {error}): it is corrupt (a download or copy "
            f"cut short?). {fix}"
        )

    # The file is opened here, not by np.load, which leaves it open when the zip cannot be read.
    with open(path, "rb") as handle:
        try:
            archive = np.load(handle, allow_pickle=False)
        except _CORRUPT_NPZ_ERRORS as error:
            raise corrupt(error) from error
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} holds a single array, not an npz archive with the arrays {list(keys)} ({layout})")
        with archive:
            missing = [key for key in keys if key not in archive.files]
            if missing:
                raise ValueError(f"{path} lacks the arrays {missing} of the {layout} layout; it holds {archive.files}")
            try:
                return {key: archive[key] for key in keys}
            except _CORRUPT_NPZ_ERRORS as error:
                raise corrupt(error) from error


def _mnist_from_npz(path: Path) -> ImageData:
    keys = ("x_train", "y_train", "x_test", "y_test")
    arrays = _read_npz(
        path, keys, "Keras mnist.npz (x_train, y_train, x_test, y_test)",
        f"Delete it and download it again, or fetch the four official IDX files instead "
        f"(ppvi.data.mnist(download=True) does, once {path.name} is gone).",
    )
    train_images, train_labels = _images_and_labels(arrays["x_train"], arrays["y_train"], str(path))
    test_images, test_labels = _images_and_labels(arrays["x_test"], arrays["y_test"], str(path))
    return ImageData(train_images, train_labels, test_images, test_labels)


def _download(name: str, expected_md5: str, directory: Path, mirrors: Iterable[str]) -> Path:
    """Fetch ``name`` from the first mirror that serves it with the right MD5, into ``directory`` atomically."""
    failures = []
    mismatch = None
    for mirror in mirrors:
        url = mirror + name
        try:
            with urlopen(url, timeout=_DOWNLOAD_TIMEOUT) as response:
                content = response.read()
        except (URLError, OSError) as error:
            failures.append(f"{url}: {error}")
            continue
        actual = _md5(content)
        if actual != expected_md5:
            mismatch = (url, actual)
            failures.append(f"{url}: MD5 {actual}, expected {expected_md5}")
            continue
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{name}.", delete=False) as handle:
            handle.write(content)
        os.replace(handle.name, directory / name)
        return directory / name
    tried = "; ".join(failures)
    if mismatch is not None:
        raise ValueError(
            f"checksum mismatch downloading {name}: {mismatch[0]} gave MD5 {mismatch[1]}, expected {expected_md5} "
            f"(tried {tried}); nothing was saved. Try again later, or fetch {name} by hand and put it in {directory}"
        )
    raise ConnectionError(
        f"could not download {name} from any MNIST mirror ({tried}); fetch it by hand and put it in {directory}"
    )


def mnist(
    root: str | Path | None = None,
    *,
    download: bool = False,
    cache_dir: str | Path | None = None,
    verify: bool = True,
    mirrors: tuple[str, ...] = MNIST_MIRRORS,
) -> ImageData:
    """MNIST (LeCun, Bottou, Bengio & Haffner 1998): 60,000 training and 10,000 test 28x28 digits.

    Pixels are scaled to float32 in [0, 1] (divided by 255); labels are int64.

    Parameters
    ----------
    root
        Where the data is: a directory holding the four IDX files (``train-images-idx3-ubyte``,
        ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or with
        ``.gz``) or a Keras-layout ``mnist.npz`` (arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``), or the
        path of such an npz. ``None``: look in ``cache_dir``.
    download
        Fetch missing ``.gz`` files from the official mirrors into ``cache_dir`` (never done unless asked).
    cache_dir
        Download directory, also searched after ``root``; default ``$PPVI_DATA/mnist`` or ``~/.cache/ppvi/mnist``.
    verify
        Check the MD5 of each ``.gz`` file that carries its official name against the published checksum (raw
        files and npz have no published checksum and are checked only by their headers and shapes).
    mirrors
        URL prefixes tried in order when downloading.

    Raises
    ------
    FileNotFoundError
        No MNIST in ``root`` or ``cache_dir`` and ``download`` is false; the message lists what is expected where.
    ValueError
        A checksum mismatch or a corrupt file; the message names the file and says what to do.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else data_directory("mnist")
    names = {field: name for field, (name, _) in MNIST_FILES.items()}
    checksums = {name: md5 for name, md5 in MNIST_FILES.values()}
    help_text = _MNIST_HELP.format(names=", ".join(names.values()), mirrors=" or ".join(mirrors), cache=cache)

    directories = [cache]
    if root is not None:
        root = Path(root).expanduser()
        if root.is_file():
            if root.suffix != ".npz":
                raise ValueError(f"root={str(root)!r} is a file but not an .npz; {help_text}")
            return _mnist_from_npz(root)
        if not root.is_dir():
            raise FileNotFoundError(f"root={str(root)!r} does not exist; {help_text}")
        directories = [root, cache]

    for directory in directories:
        found = {field: _find_idx(directory, name) for field, name in names.items()}
        if all(path is not None for path in found.values()):
            break
        if (directory / "mnist.npz").is_file():
            return _mnist_from_npz(directory / "mnist.npz")
    else:
        if not download:
            looked = "; ".join(
                f"{directory} lacks {', '.join(name for name in names.values() if not _find_idx(directory, name))}"
                for directory in directories
            )
            raise FileNotFoundError(f"MNIST not found ({looked}); {help_text}")
        found = {field: _find_idx(cache, name) for field, name in names.items()}
        for field, path in found.items():
            if path is None:
                gz_name = f"{names[field]}.gz"
                found[field] = _download(gz_name, checksums[names[field]], cache, mirrors)

    arrays = {}
    for field, path in found.items():
        official = path.name.endswith(".gz") and path.name[: -len(".gz")] in checksums
        arrays[field] = read_idx(path, checksums[path.name[: -len(".gz")]] if verify and official else None)
    source = str(found["train_images"].parent)
    train_images, train_labels = _images_and_labels(arrays["train_images"], arrays["train_labels"], source)
    test_images, test_labels = _images_and_labels(arrays["test_images"], arrays["test_labels"], source)
    return ImageData(train_images, train_labels, test_images, test_labels)


def binarized_mnist(path: str | Path | None = None, *, include_validation: bool = False) -> ImageData:
    """The statically binarized MNIST of Larochelle & Murray (2011, "The neural autoregressive distribution
    estimator"), the standard benchmark for VAE log-likelihoods (e.g. Burda, Grosse & Salakhutdinov 2016).

    Parameters
    ----------
    path
        The ``binarized_mnist.npz`` (arrays ``train`` 50,000 x 784, ``valid`` 10,000 x 784, ``test``
        10,000 x 784, values 0/1), or a directory holding it; default ``$PPVI_DATA/binarized_mnist`` or
        ``~/.cache/ppvi/binarized_mnist``.
    include_validation
        False (default): ``train_images`` is the 50,000-image ``train`` split and the ``valid`` split is left out
        (use it for early stopping by loading with ``include_validation=True`` and slicing the last 10,000).
        True: ``train_images`` is ``train`` followed by ``valid`` (60,000 images), as in Burda et al. (2016).

    Returns
    -------
    Images of shape ``(n, 28, 28)``, float32 0/1; labels are ``None`` (the set has none).
    """
    where = Path(path).expanduser() if path is not None else data_directory("binarized_mnist")
    if where.is_dir():
        where = where / "binarized_mnist.npz"
    if not where.is_file():
        raise FileNotFoundError(
            f"{where} not found: binarized MNIST (Larochelle & Murray 2011) is expected as an npz with arrays "
            "train, valid and test (n x 784, 0/1); build it from the published binarized_mnist_{train,valid,test}"
            ".amat files and pass its path (published at www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/)"
        )
    splits = _read_npz(
        where, ("train", "valid", "test"), "binarized MNIST (train, valid, test)",
        "Delete it and rebuild it from the published .amat files.",
    )
    for key, array in splits.items():
        # 784 = 28 x 28 pixels per image.
        if array.ndim != 2 or array.shape[1] != 784 or not ((array == 0) | (array == 1)).all():
            raise ValueError(f"{where}: split {key!r} should be n x 784 zeros and ones, got shape {array.shape}")
    train = np.concatenate([splits["train"], splits["valid"]]) if include_validation else splits["train"]
    return ImageData(
        train.reshape(-1, 28, 28).astype(np.float32), None, splits["test"].reshape(-1, 28, 28).astype(np.float32), None
    )


def binarize(images: np.ndarray, seed: int | None = 0) -> np.ndarray:
    """Dynamic binarization: each pixel becomes 1 with probability equal to its intensity (independent Bernoulli
    draws), as in Salakhutdinov & Murray (2008); draw afresh each epoch by changing ``seed``.

    Parameters
    ----------
    images
        Intensities in [0, 1], any shape.
    seed
        Seed of the draws; ``None`` for fresh, unseeded randomness.

    Returns
    -------
    float32 array of zeros and ones, the shape of ``images``.
    """
    probabilities = np.asarray(images, dtype=np.float64)
    if probabilities.size and not (probabilities.min() >= 0.0 and probabilities.max() <= 1.0):
        raise ValueError(
            f"binarize needs intensities in [0, 1], got values in [{probabilities.min()}, {probabilities.max()}]: "
            "scale 8-bit pixels by 1/255 first"
        )
    generator = np.random.default_rng(seed)
    return (generator.random(probabilities.shape) < probabilities).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# corpora

_CORPUS_SOURCES = {
    "20news": (
        "20 Newsgroups as prepared by NVDM (Miao, Yu & Blunsom 2016) and ProdLDA (Srivastava & Sutton 2017): "
        "train.feat, test.feat and vocab.new from github.com/ysmiao/nvdm (data/20news)"
    ),
    "ap": "Blei's AP corpus from lda-c (www.cs.columbia.edu/~blei/lda-c/, ap.tgz): ap.dat and vocab.txt",
}

#: MD5s of the original files of the named corpora (PROVENANCE_corpus.md in the shared data folder), checked when a
#: named source is read from its original text format.
_CORPUS_CHECKSUMS = {
    "20news": {
        "train.feat": "65311c400d090f7a529cf636a71708b9",
        "test.feat": "b6276ed1208ba8e64136d0d3634c4315",
        "vocab.new": "5d86faeba7103f3b143cf5eb9123e138",
    },
    "ap": {"ap.dat": "16f5cef73e734c116a9c26845fd4a439", "vocab.txt": "3d23b2911c44bd36433735ccb0dc9671"},
}

_CORPUS_LAYOUTS = (
    "one of these layouts: (a) train_counts.npz [+ test_counts.npz] or a single <name>_counts.npz (scipy.sparse "
    "CSR, documents x words) with vocab.txt (one word a line); (b) NVDM: train.feat [+ test.feat] (lines "
    "'1 id:count ...', 1-based ids) with vocab.new (word in the first column); (c) lda-c: one .dat file (lines "
    "'N id:count ...', 0-based ids) with vocab.txt"
)


def _parse_sparse_lines(lines: Iterable[str], n_words: int, one_based: bool, source: str) -> scipy.sparse.csr_matrix:
    """Shared core of :func:`parse_nvdm` and :func:`parse_lda_c`: lines ``"N id:count ..."`` to a CSR matrix.

    The numbers of all lines are converted in one numpy call (ten times faster than per-line Python on the
    20 Newsgroups files); on an error the offending line is located afterwards for the message.
    """
    import scipy.sparse

    line_numbers, token_counts, tokens = [], [], []
    for line_number, line in enumerate(lines, start=1):
        fields = line.replace(":", " ").split()
        if not fields:
            continue
        if line.count(":") != len(line.split()) - 1 or len(fields) % 2 == 0:
            raise ValueError(
                f"{source}, line {line_number}: cannot parse {line.strip()[:60]!r} as 'N id:count ...': the file is "
                "corrupt or in another format"
            )
        line_numbers.append(line_number)
        token_counts.append(len(fields))
        tokens.extend(fields)

    def where(document: int) -> str:
        return f"{source}, line {line_numbers[document]}"

    starts = np.cumsum([0, *token_counts])[:-1].astype(np.int64)
    try:
        numbers = np.array(tokens, dtype=np.int64)
    except ValueError as error:
        index = next(index for index, token in enumerate(tokens) if not _is_integer(token))
        document = int(np.searchsorted(starts, index, side="right")) - 1
        raise ValueError(
            f"{where(document)}: cannot parse {tokens[index]!r} as an integer in 'N id:count ...' ({error}): the file "
            "is corrupt"
        ) from error
    pair_counts = (np.asarray(token_counts, dtype=np.int64) - 1) // 2
    leading = numbers[starts] if len(starts) else numbers[:0]
    if not one_based and (leading != pair_counts).any():
        document = int(np.flatnonzero(leading != pair_counts)[0])
        raise ValueError(
            f"{where(document)}: lda-c line declares {leading[document]} distinct words but lists "
            f"{pair_counts[document]}: the file is corrupt or truncated"
        )
    is_leading = np.zeros(len(numbers), dtype=bool)
    is_leading[starts] = True
    pairs = numbers[~is_leading].reshape(-1, 2)
    ids = pairs[:, 0] - (1 if one_based else 0)
    counts = pairs[:, 1]
    documents = np.repeat(np.arange(len(starts)), pair_counts)
    bad = (ids < 0) | (ids >= n_words)
    if bad.any():
        raise ValueError(
            f"{where(int(documents[np.flatnonzero(bad)[0]]))}: word id out of range for a vocabulary of {n_words} "
            f"words ({'1-based' if one_based else '0-based'} ids): is the vocabulary file the matching one?"
        )
    if (counts < 0).any():
        raise ValueError(f"{where(int(documents[np.flatnonzero(counts < 0)[0]]))}: negative count: the file is corrupt")
    # Duplicate (document, word) pairs are summed by the COO -> CSR conversion.
    matrix = scipy.sparse.coo_matrix((counts, (documents, ids)), shape=(len(starts), n_words)).tocsr()
    matrix.sort_indices()
    return matrix


def _is_integer(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def parse_nvdm(text: str, n_words: int, source: str = "NVDM data") -> scipy.sparse.csr_matrix:
    """Parse NVDM's ``.feat`` format (Miao, Yu & Blunsom 2016): one document a line, ``"1 id:count ..."``.

    The leading field is a placeholder label; ``id`` is the 1-based line of the word in ``vocab.new``, so column
    ``id - 1`` of the result. Every line is a document, empty ones included (as rows of zeros); blank lines are
    skipped.
    """
    return _parse_sparse_lines(text.splitlines(), n_words, one_based=True, source=source)


def parse_lda_c(text: str, n_words: int, source: str = "lda-c data") -> scipy.sparse.csr_matrix:
    """Parse Blei's lda-c format: one document a line, ``"N id:count ..."`` with ``N`` distinct 0-based ids."""
    return _parse_sparse_lines(text.splitlines(), n_words, one_based=False, source=source)


def drop_short_documents(matrix: scipy.sparse.csr_matrix, min_document_length: int) -> scipy.sparse.csr_matrix:
    """Keep the rows (documents) whose total count is at least ``min_document_length``."""
    lengths = np.asarray(matrix.sum(axis=1)).ravel()
    return matrix[lengths >= min_document_length]


def _vocabulary_words(text: str) -> list[str]:
    """The first field of each non-blank line (NVDM's vocab.new carries a count after the word)."""
    words = []
    for line in text.splitlines():
        fields = line.split()
        if fields:
            words.append(fields[0])
    return words


def _load_counts(path: Path, n_words: int) -> scipy.sparse.csr_matrix:
    import scipy.sparse

    try:
        matrix = scipy.sparse.load_npz(path)
    except _CORRUPT_NPZ_ERRORS as error:
        raise ValueError(
            f"{path} is not a scipy.sparse npz ({type(error).__name__}: {error}): it is corrupt; delete it and "
            "rebuild or fetch it again"
        ) from error
    if matrix.ndim != 2 or matrix.shape[1] != n_words:
        raise ValueError(
            f"{path} has shape {matrix.shape} but the vocabulary has {n_words} words: the count matrix and "
            "vocab.txt do not belong together"
        )
    matrix = scipy.sparse.csr_matrix(matrix, dtype=np.int64)
    if matrix.nnz and matrix.data.min() < 0:
        raise ValueError(f"{path} holds negative counts: it is corrupt")
    return matrix


def _read_checked(path: Path, checksums: dict[str, str]) -> str:
    content = path.read_bytes()
    expected = checksums.get(path.name)
    if expected is not None and _md5(content) != expected:
        raise ValueError(
            f"checksum mismatch for {path}: MD5 {_md5(content)}, expected {expected} (the published file): it is "
            "corrupt or a different version; fetch it again, or pass its directory as source= to read it unchecked"
        )
    return content.decode("utf-8")


def _corpus_matrices(
    directory: Path, checksums: dict[str, str]
) -> tuple[scipy.sparse.csr_matrix, scipy.sparse.csr_matrix | None, list[str]] | None:
    """Read whichever layout ``directory`` holds; ``None`` when it holds none."""
    npz_files = sorted(directory.glob("*_counts.npz"))
    vocabulary_text = directory / "vocab.txt"
    if npz_files and vocabulary_text.is_file():
        vocabulary = _vocabulary_words(vocabulary_text.read_text(encoding="utf-8"))
        train_path = directory / "train_counts.npz"
        if not train_path.is_file():
            if len(npz_files) != 1:
                raise ValueError(
                    f"{directory} holds several count files {[p.name for p in npz_files]} but no "
                    "train_counts.npz: name the training matrix train_counts.npz"
                )
            train_path = npz_files[0]
        test_path = directory / "test_counts.npz"
        test = _load_counts(test_path, len(vocabulary)) if test_path.is_file() else None
        return _load_counts(train_path, len(vocabulary)), test, vocabulary
    if (directory / "train.feat").is_file() and (directory / "vocab.new").is_file():
        vocabulary = _vocabulary_words(_read_checked(directory / "vocab.new", checksums))
        matrices = [
            parse_nvdm(_read_checked(directory / name, checksums), len(vocabulary), source=str(directory / name))
            if (directory / name).is_file()
            else None
            for name in ("train.feat", "test.feat")
        ]
        return matrices[0], matrices[1], vocabulary
    dat_files = sorted(directory.glob("*.dat"))
    if dat_files and vocabulary_text.is_file():
        if len(dat_files) != 1:
            raise ValueError(f"{directory} holds several .dat files {[p.name for p in dat_files]}: keep one")
        vocabulary = _vocabulary_words(_read_checked(vocabulary_text, checksums))
        text = _read_checked(dat_files[0], checksums)
        return parse_lda_c(text, len(vocabulary), source=str(dat_files[0])), None, vocabulary
    return None


def corpus(source: str | Path = "20news", root: str | Path | None = None, *, min_document_length: int = 1) -> Corpus:
    """A bag-of-words corpus as int64 CSR document-term counts and its vocabulary.

    Parameters
    ----------
    source
        ``"20news"``: 20 Newsgroups as prepared by NVDM (Miao, Yu & Blunsom 2016) and used by ProdLDA (Srivastava
        & Sutton 2017), 1,995 words, 11,258 training and 7,487 test documents. ``"ap"``: Blei's Associated Press
        corpus from lda-c (Blei, Ng & Jordan 2003), 2,246 documents, 10,473 words, no test split. Or the path of
        a directory in one of the layouts below (read without checksums).
    root
        Directory of a named source; default ``$PPVI_DATA/<source>`` or ``~/.cache/ppvi/<source>``.
    min_document_length
        Documents with fewer tokens than this are dropped from both splits. The default 1 drops only empty
        documents (each NVDM ``.feat`` file ends with one); 0 keeps every document.

    The directory holds one of: ``train_counts.npz`` (+ ``test_counts.npz``) or one ``<name>_counts.npz``
    (scipy.sparse CSR) with ``vocab.txt``; NVDM's ``train.feat`` (+ ``test.feat``) with ``vocab.new``; or
    lda-c's ``<name>.dat`` with ``vocab.txt``. For the named sources the original text files are checked
    against their published MD5s.

    Raises
    ------
    FileNotFoundError
        No corpus in the directory; the message says which files are expected, where, and where to get them.
    ValueError
        An unknown source name, a checksum mismatch or a corrupt file.
    """
    if min_document_length < 0:
        raise ValueError(f"min_document_length must be >= 0, got {min_document_length}")
    source_text = str(source)
    if source_text in _CORPUS_SOURCES:
        directory = Path(root).expanduser() if root is not None else data_directory(source_text)
        checksums = _CORPUS_CHECKSUMS[source_text]
        where_to_get = _CORPUS_SOURCES[source_text]
    elif Path(source_text).expanduser().is_dir():
        if root is not None:
            raise ValueError(f"source={source_text!r} is already a directory; root= is only for a named source")
        directory = Path(source_text).expanduser()
        checksums = {}
        where_to_get = "your own data"
    elif os.sep in source_text or Path(source_text).suffix:
        raise FileNotFoundError(
            f"source={source_text!r} is not an existing directory; it should hold {_CORPUS_LAYOUTS}"
        )
    else:
        raise ValueError(f"unknown corpus {source_text!r}: use one of {sorted(_CORPUS_SOURCES)} or a directory path")
    found = _corpus_matrices(directory, checksums) if directory.is_dir() else None
    if found is None:
        raise FileNotFoundError(
            f"no corpus found in {directory}: expected {_CORPUS_LAYOUTS}. Source: {where_to_get}. Put the files "
            f"there, or pass root= (or set $PPVI_DATA) to point at them"
        )
    train, test, vocabulary = found
    train = drop_short_documents(train, min_document_length)
    test = drop_short_documents(test, min_document_length) if test is not None else None
    return Corpus(train, test, vocabulary)
