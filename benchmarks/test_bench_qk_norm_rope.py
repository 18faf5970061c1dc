"""pytest-benchmark: qk_norm_rope on every implementation, forward and forward+backward
(shapes and implementations as in `olmo2-bench`)."""
import pytest

from benchmarks import bench_support

OP = "qk_norm_rope"


@pytest.mark.parametrize("case,impl,pass_", bench_support.params(OP))
def test_qk_norm_rope(benchmark, case, impl, pass_):
    bench_support.run(benchmark, case, impl, pass_)
