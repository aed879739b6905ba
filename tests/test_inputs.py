"""Tests of ppvi.inputs: device and dtype resolution (CUDA availability is monkeypatched, so the tests behave the same
with or without a GPU), the computation context, and the checking and conversion of the user's data."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

from ppvi.inputs import accepts_keyword, computation, prepare_arguments, resolve_device, resolve_dtype

CPU = torch.device("cpu")


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


# --- resolve_device -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda:1")])
def test_cuda_without_cuda_raises_naming_the_fix(no_cuda, device):
    with pytest.raises(RuntimeError, match="CUDA is not available") as raised:
        resolve_device(device)
    message = str(raised.value)
    assert "device='cpu'" in message and "device='auto'" in message
    assert torch.__version__ in message


def test_auto_is_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == CPU


def test_auto_and_cuda_with_cuda(fake_cuda):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_cpu_is_always_available(no_cuda, device):
    assert resolve_device(device) == CPU


@pytest.mark.parametrize("device", ["gpu", "CUDA", "", "cuda:x", "auto:0"])
def test_unknown_device_strings_raise_value_error(device):
    with pytest.raises(ValueError, match=f"unknown device {device!r}: use 'cpu', 'cuda' or 'auto'"):
        resolve_device(device)


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_other_torch_devices_are_unsupported(device):
    with pytest.raises(ValueError, match=f"unsupported device {device!r}"):
        resolve_device(device)


# --- resolve_dtype ------------------------------------------------------------------------------------------------


def test_auto_dtype_is_float64_on_cpu_and_float32_on_cuda():
    assert resolve_dtype("auto", CPU) is torch.float64
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float32


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("float32", torch.float32), ("float64", torch.float64), (torch.float32, torch.float32),
     (torch.float64, torch.float64)],
)
def test_named_dtypes_win_over_the_device(dtype, expected):
    assert resolve_dtype(dtype, CPU) is expected
    assert resolve_dtype(dtype, torch.device("cuda")) is expected


@pytest.mark.parametrize("dtype", ["float16", "double", "int64", torch.float16, torch.bfloat16, torch.int64])
def test_other_dtypes_raise_value_error(dtype):
    with pytest.raises(ValueError, match="dtype must be 'auto', 'float32' or 'float64'"):
        resolve_dtype(dtype, CPU)


# --- computation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("outer", "inner"), [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_computation_sets_and_restores_the_default_dtype(outer, inner):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(outer)
    try:
        with computation(CPU, inner):
            assert torch.zeros(1).dtype is inner
            assert torch.tensor(0.5).dtype is inner
            assert torch.get_default_dtype() is inner
            assert pyro.settings.get("module_local_params") is True
        assert torch.get_default_dtype() is outer
        assert torch.zeros(1).dtype is outer
        assert pyro.settings.get("module_local_params") is False
    finally:
        torch.set_default_dtype(previous)


def test_computation_restores_the_default_dtype_when_the_body_raises():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with pytest.raises(KeyError, match="boom"), computation(CPU, torch.float64):
            assert torch.zeros(1).dtype is torch.float64
            raise KeyError("boom")
        assert torch.get_default_dtype() is torch.float32
        assert torch.zeros(1).dtype is torch.float32
        assert pyro.settings.get("module_local_params") is False
    finally:
        torch.set_default_dtype(previous)


def test_computation_makes_the_device_the_default():
    with computation(torch.device("meta"), torch.float64):
        assert torch.zeros(1).device.type == "meta"
    assert torch.zeros(1).device == CPU


# --- prepare_arguments --------------------------------------------------------------------------------------------


def model(x, y, labels=None, name="n"):
    pass


def test_numpy_float_arrays_become_tensors_in_the_requested_dtype():
    x = np.linspace(0.0, 1.0, 5)
    y = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    for dtype in (torch.float64, torch.float32):
        (x_t, y_t), _ = prepare_arguments(model, (x, y), {}, CPU, dtype)
        assert isinstance(x_t, torch.Tensor) and x_t.dtype is dtype and x_t.device == CPU
        assert y_t.dtype is dtype and y_t.shape == (2, 3)
        np.testing.assert_allclose(x_t.numpy(), x, rtol=1e-7)
        np.testing.assert_allclose(y_t.numpy(), y, rtol=1e-7)
    # float64 keeps every bit of a float64 array
    (x_t, _), _ = prepare_arguments(model, (x, y), {}, CPU, torch.float64)
    np.testing.assert_array_equal(x_t.numpy(), x)


def test_integer_and_boolean_arrays_stay_integer():
    counts = np.array([0, 3, 7], dtype=np.int32)
    flags = np.array([True, False])
    (counts_t, flags_t), kwargs = prepare_arguments(model, (counts, flags), {"labels": np.arange(4)}, CPU,
                                                    torch.float64)
    assert counts_t.dtype is torch.int32 and counts_t.tolist() == [0, 3, 7]
    assert flags_t.dtype is torch.bool and flags_t.tolist() == [True, False]
    assert kwargs["labels"].dtype is torch.int64 and kwargs["labels"].tolist() == [0, 1, 2, 3]


def test_tensors_are_moved_to_the_requested_dtype():
    x = torch.tensor([1.0, 2.0], dtype=torch.float32)
    counts = torch.tensor([1, 2])
    (x_t, counts_t), _ = prepare_arguments(model, (x, counts), {}, CPU, torch.float64)
    assert x_t.dtype is torch.float64 and x_t.tolist() == [1.0, 2.0]
    assert counts_t.dtype is torch.int64


def test_lists_of_numbers_are_converted():
    (x_t, y_t), kwargs = prepare_arguments(model, ([1.0, 2.5], (1, 2, 3)), {"labels": [[1, 0], [0, 1]]}, CPU,
                                           torch.float32)
    assert x_t.dtype is torch.float32 and x_t.tolist() == [1.0, 2.5]
    assert y_t.dtype is torch.int64 and y_t.tolist() == [1, 2, 3]
    assert kwargs["labels"].shape == (2, 2) and kwargs["labels"].dtype is torch.int64


def test_non_numeric_arguments_pass_through_unchanged():
    strings, empty, mixed, obj = ["a", "b"], [], [1.0, "a"], object()
    (a, b), kwargs = prepare_arguments(model, (strings, empty), {"labels": mixed, "name": obj}, CPU, torch.float64)
    assert a is strings and b is empty and kwargs["labels"] is mixed and kwargs["name"] is obj
    (a, b), kwargs = prepare_arguments(model, (None, 3.5), {"name": "plain"}, CPU, torch.float64)
    assert a is None and b == 3.5 and kwargs["name"] == "plain"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_in_a_positional_argument_names_it_and_the_index(bad):
    y = np.array([1.0, 2.0, 3.0, bad, 5.0])
    with pytest.raises(ValueError, match=r"^data argument 'y' holds 1 NaN or infinite value\(s\), first at index") as e:
        prepare_arguments(model, (np.zeros(2), y), {}, CPU, torch.float64)
    assert "[3]" in str(e.value)


def test_nan_in_a_two_dimensional_keyword_argument_names_it_and_the_index():
    labels = torch.ones(3, 4)
    labels[2, 1] = float("nan")
    labels[0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"keyword argument 'labels' holds 2 NaN") as e:
        prepare_arguments(model, (), {"labels": labels}, CPU, torch.float64)
    assert "(0, 3)" in str(e.value) and "(2, 1)" in str(e.value)


def test_nan_in_a_list_is_rejected():
    with pytest.raises(ValueError, match="data argument 'x'.*index \\[1\\]"):
        prepare_arguments(model, ([1.0, float("nan")], None), {}, CPU, torch.float64)


def test_arguments_beyond_the_signature_are_numbered():
    def variadic(*args):
        pass

    with pytest.raises(ValueError, match="data argument 'argument 1'"):
        prepare_arguments(variadic, (np.zeros(2), np.array([np.nan])), {}, CPU, torch.float64)


def test_the_users_objects_are_not_modified():
    x = np.array([1.0, 2.0, 3.0])
    y = torch.tensor([4.0, 5.0], dtype=torch.float32)
    labels = np.array([1, 2])
    x_copy, y_copy, labels_copy = x.copy(), y.clone(), labels.copy()
    args, kwargs = prepare_arguments(model, (x, y), {"labels": labels}, CPU, torch.float64)
    assert isinstance(x, np.ndarray) and x.dtype == np.float64 and np.array_equal(x, x_copy)
    assert y.dtype is torch.float32 and torch.equal(y, y_copy)
    assert isinstance(labels, np.ndarray) and np.array_equal(labels, labels_copy)
    # Converting a float array copies it: writing to the converted tensor leaves the user's array alone.
    args[0][0] = -1.0
    assert x[0] == 1.0
    # And the rejected call leaves its input intact too.
    bad = np.array([1.0, np.nan])
    with pytest.raises(ValueError):
        prepare_arguments(model, (bad, None), {}, CPU, torch.float64)
    assert bad[0] == 1.0 and np.isnan(bad[1])


# --- accepts_keyword ----------------------------------------------------------------------------------------------


def test_accepts_keyword():
    def explicit(x, *, scale=1.0):
        pass

    def catch_all(x, **kwargs):
        pass

    def neither(x, *args):
        pass

    assert accepts_keyword(explicit, "scale") and accepts_keyword(explicit, "x")
    assert not accepts_keyword(explicit, "obs")
    assert accepts_keyword(catch_all, "anything")
    assert not accepts_keyword(neither, "scale")
    assert accepts_keyword(model, "labels")
    assert not accepts_keyword(max, "key")  # a builtin whose signature inspect cannot read (it does take key=)


def test_tensors_that_require_grad_are_detached():
    y = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    args, kwargs = prepare_arguments(model, (y, None), {"labels": y}, CPU, torch.float64)
    assert not args[0].requires_grad and not kwargs["labels"].requires_grad
    args[0].sum()  # no graph back to y
    assert y.grad is None and torch.equal(args[0], y.detach())


def test_small_computations_run_on_one_thread_and_large_ones_keep_torchs_setting():
    from ppvi.inputs import PARALLEL_MIN_ELEMENTS, threads_for

    cpu = torch.device("cpu")
    small = torch.zeros(1000, 8)
    assert threads_for((small,), {}, cpu) == 1
    assert threads_for((small,), {}, cpu, batch=PARALLEL_MIN_ELEMENTS // 8000 + 1) is None  # the draws multiply
    assert threads_for((torch.zeros(PARALLEL_MIN_ELEMENTS),), {}, cpu) is None
    assert threads_for((small,), {}, torch.device("meta")) is None  # only the CPU is pinned


def test_draws_of_a_small_model_run_on_one_thread_and_restore_the_users_setting():
    import pyro
    import pyro.distributions as dist

    import ppvi

    seen = []

    def model(y):
        seen.append(torch.get_num_threads())
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit = ppvi.fit(model, torch.zeros(10, dtype=torch.float64), guide="meanfield", steps=20)
        seen.clear()
        fit.summary()
        fit.diagnose()
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
