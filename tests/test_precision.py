"""--dtype auto: bfloat16 exactly where the CPU has bfloat16 matrix instructions, and a line that says so."""
import io

import pytest
import torch

from modules.speed import precision

XEON_WITH_AMX = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC_WITH_AVX2 = "flags\t\t: fpu sse2 avx2 fma\n"
ARM_WITH_BF16 = "Features\t: fp asimd bf16 i8mm\n"


@pytest.fixture
def cpuinfo(monkeypatch):
    """Makes precision read `text` as /proc/cpuinfo (None: the file cannot be read)."""
    def use(text):
        def fake_open(path, *args, **kwargs):
            assert path == "/proc/cpuinfo"
            if text is None:
                raise FileNotFoundError(path)
            return io.StringIO("processor\t: 0\n" + text)
        monkeypatch.setattr(precision, "open", fake_open, raising=False)
        precision.cpu_flags.cache_clear()
    yield use
    precision.cpu_flags.cache_clear()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("text, expected", [(XEON_WITH_AMX, torch.bfloat16), (ARM_WITH_BF16, torch.bfloat16),
                                            (EPYC_WITH_AVX2, torch.float32), (None, torch.float32)])
def test_auto_is_bfloat16_only_where_the_cpu_computes_it(cpuinfo, text, expected):
    cpuinfo(text)
    assert precision.auto_dtype("cpu") == expected
    assert precision.resolve_dtype("auto", "cpu") == expected
    assert precision.resolve_dtype("float32", "cpu") == torch.float32  # a dtype given by name is taken as it is


def test_the_choice_is_described(cpuinfo):
    cpuinfo(EPYC_WITH_AVX2)
    assert precision.describe_precision("auto", "cpu") == "precision: float32 (--dtype auto: no native bfloat16 on this cpu)"
    assert precision.describe_precision("bfloat16", "cpu") == "precision: bfloat16"
