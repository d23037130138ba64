"""The host description carried by every measured figure: CPU name plus the int8/bf16 flags."""

import pytest

from kdcompress.common import host

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma\n"
AVX512 = "model name\t: AMD EPYC\nflags\t\t: avx avx2 avx512f avx512_vnni avx512_bf16 avx512bw\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd asimddp i8mm bf16\n"


@pytest.fixture
def cpuinfo(monkeypatch):
    def use(text):
        monkeypatch.setattr(host, "_cpuinfo", lambda: text.splitlines())
        host.cpu_flags.cache_clear()
        host.cpu_name.cache_clear()
    yield use
    host.cpu_flags.cache_clear()
    host.cpu_name.cache_clear()


@pytest.mark.parametrize("text, flags, name, bf16", [
    (AVX2, ("avx2",), "AMD EPYC (avx2)", False),
    (AVX512, ("avx2", "avx512f", "avx512_vnni", "avx512_bf16"), "AMD EPYC (avx2, avx512f, avx512_vnni, avx512_bf16)",
     True),
    (ARM, ("asimddp", "i8mm", "bf16"), None, True),
])
def test_flags_name_and_native_bf16(cpuinfo, text, flags, name, bf16):
    cpuinfo(text)
    assert host.cpu_flags() == flags
    assert host.native_bf16() is bf16
    if name:
        assert host.cpu_name() == name
    else:  # no model name line (ARM): the platform's name, still with the flags
        assert host.cpu_name().endswith("(asimddp, i8mm, bf16)")


def test_no_cpuinfo(cpuinfo):
    cpuinfo("")
    assert host.cpu_flags() == () and not host.native_bf16() and "(" not in host.cpu_name()
