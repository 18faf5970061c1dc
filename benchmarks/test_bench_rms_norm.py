"""pytest-benchmark: rms_norm on every implementation, forward and forward+backward
(shapes and implementations as in `olmo2-bench`)."""
import pytest

from benchmarks import bench_support

OP = "rms_norm"


@pytest.mark.parametrize("case,impl,pass_", bench_support.params(OP))
def test_rms_norm(benchmark, case, impl, pass_):
    bench_support.run(benchmark, case, impl, pass_)
