"""Backend selection: requests, availability, explicit errors, and the package
working without its compiled extension."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import olmo2_kernels
from olmo2_kernels import _backend


def test_backend_info_structure():
    info = olmo2_kernels.backend_info()
    assert set(info["backends"]) == {"torch", "triton", "cuda", "cpu"}
    assert info["backends"]["torch"]["available"] == ["cpu", "cuda"]
    for name, entry in info["backends"].items():
        for device, reason in entry["unavailable_reason"].items():
            assert device not in entry["available"]
            assert isinstance(reason, str) and reason, (name, device)
    assert info["auto"]["cpu"] in ("cpu", "torch")
    ext = info["extension"]
    assert ext["loaded"] == (ext["error"] is None)


def test_use_backend_nests_and_restores():
    assert _backend.requested() in _backend.CHOICES
    outer = _backend.requested()
    with olmo2_kernels.use_backend("torch"):
        assert _backend.requested() == "torch"
        with olmo2_kernels.use_backend("auto"):
            assert _backend.requested() == "auto"
        assert _backend.requested() == "torch"
    assert _backend.requested() == outer


def test_use_backend_is_per_thread():
    """A selection in one thread is not seen by another running meanwhile."""
    import threading

    outer = _backend.requested()
    entered, release, seen = threading.Event(), threading.Event(), {}

    def worker():
        with olmo2_kernels.use_backend("torch"):
            entered.set()
            release.wait(10)
            seen["worker"] = _backend.requested()

    thread = threading.Thread(target=worker)
    thread.start()
    assert entered.wait(10)
    seen["main"] = _backend.requested()  # while the worker's block is open
    release.set()
    thread.join(10)
    assert seen == {"worker": "torch", "main": outer}
    assert _backend.requested() == outer


def test_compiled_function_follows_the_selection():
    """torch.compile(fullgraph=True) traces the selection and recompiles when it changes."""
    calls = []
    real = _backend.resolve

    def resolve(op, device, dtype):
        calls.append(_backend.requested())
        return real(op, device, dtype)

    x, w = torch.randn(3, 8), torch.randn(8)
    fn = torch.compile(lambda x: olmo2_kernels.rms_norm(x, w), fullgraph=True, backend="eager")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_backend, "resolve", resolve)
        with olmo2_kernels.use_backend("torch"):
            torch.testing.assert_close(fn(x), olmo2_kernels.reference.rms_norm(x, w, 1e-6))
        with olmo2_kernels.use_backend("cpu" if _backend.unavailable_reason("cpu", "cpu") is None else "auto"):
            fn(x)
    assert calls[0] == "torch" and calls[-1] != "torch"


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of"):
        with olmo2_kernels.use_backend("tpu"):
            pass


def test_env_var_rejects_unknown_name(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="OLMO2_KERNELS_BACKEND must be one of"):
        olmo2_kernels.rms_norm(torch.ones(2, 4), torch.ones(4))


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    assert _backend.resolve("rms_norm", torch.device("cpu"), torch.float32) == "torch"


def test_unavailable_backend_is_an_error_not_a_fallback():
    with olmo2_kernels.use_backend("cuda"):
        with pytest.raises(olmo2_kernels.BackendUnavailableError, match="rms_norm: backend 'cuda' is unavailable for cpu tensors"):
            olmo2_kernels.rms_norm(torch.ones(2, 4), torch.ones(4))


def test_float64_runs_on_torch_under_auto_and_is_refused_by_kernels():
    x = torch.randn(3, 8, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    with olmo2_kernels.use_backend("auto"):
        assert _backend.resolve("rms_norm", x.device, x.dtype) == "torch"
        olmo2_kernels.rms_norm(x, w)
    with olmo2_kernels.use_backend("triton"):
        with pytest.raises(TypeError, match="rms_norm: backend 'triton' supports dtypes"):
            olmo2_kernels.rms_norm(x, w)


def test_auto_on_cpu_prefers_the_extension_when_it_has_the_op():
    expected = "cpu" if _backend.unavailable_reason("cpu", "cpu", "rms_norm") is None else "torch"
    with olmo2_kernels.use_backend("auto"):
        assert _backend.resolve("rms_norm", torch.device("cpu"), torch.float32) == expected


def test_public_backend_queries_agree_with_what_a_call_runs(monkeypatch):
    import importlib

    assert olmo2_kernels.OPS == tuple(importlib.import_module(f"olmo2_kernels.{op}").OP for op in olmo2_kernels.OPS)
    cpu = torch.device("cpu")
    for op in olmo2_kernels.OPS:
        with olmo2_kernels.use_backend("auto"):
            assert olmo2_kernels.selected_backend(op, "cpu", torch.float32) == _backend.resolve(op, cpu, torch.float32)
            assert olmo2_kernels.selected_backend(op, cpu, torch.float64) == "torch"
        with olmo2_kernels.use_backend("cuda"):
            with pytest.raises(olmo2_kernels.BackendUnavailableError, match=f"{op}: backend 'cuda' is unavailable"):
                olmo2_kernels.selected_backend(op, cpu)
        for backend in olmo2_kernels.BACKENDS:
            assert olmo2_kernels.backend_unavailable_reason(backend, "cpu", op) == _backend.unavailable_reason(
                backend, "cpu", op)
    assert olmo2_kernels.backend_unavailable_reason("torch", "cpu", "rms_norm", torch.float64) is None
    assert "not torch.float64" in olmo2_kernels.backend_unavailable_reason("cpu", "cpu", "rms_norm", torch.float64)
    assert olmo2_kernels.backend_unavailable_reason("cuda", "cpu") == "the cuda backend runs CUDA tensors, not cpu tensors"
    with pytest.raises(ValueError, match="op must be one of"):
        olmo2_kernels.selected_backend("layer_norm", cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        olmo2_kernels.backend_unavailable_reason("rocm", cpu)


def test_triton_on_cpu_needs_the_interpreter():
    reason = _backend.unavailable_reason("triton", "cpu", "rms_norm")
    if _backend.TRITON_INTERPRET:
        assert reason is None
    else:
        assert "TRITON_INTERPRET" in reason


def test_package_works_without_the_extension():
    # Block the compiled module in a fresh interpreter: the package must import,
    # say why the extension is missing, and run the ops on the other backends.
    code = textwrap.dedent(
        """
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "olmo2_kernels._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, olmo2_kernels
        info = olmo2_kernels.backend_info()
        assert not info["extension"]["loaded"]
        print(info["backends"]["cpu"]["unavailable_reason"]["cpu"])
        assert info["auto"]["cpu"] == "torch"
        y = olmo2_kernels.rms_norm(torch.ones(2, 4), torch.ones(4))
        assert torch.allclose(y, torch.ones(2, 4), atol=1e-5)
        """
    )
    env = dict(os.environ)
    env.pop(_backend.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "blocked for the test" in out.stdout
