"""The one machine description: result rows, reports, benchmark and analysis documents."""

from __future__ import annotations


def test_describe_and_its_summary():
    from raymed.machine import describe, summary

    m = describe()
    assert set(m) == {"cpu", "cores", "memory_gb", "platform", "gpu", "versions"}
    assert m["cores"] >= 1 and m["versions"]["python"] and m["versions"]["torch"]
    assert set(describe(load=True, with_commit=True)) == set(m) | {"load_average", "commit"}
    line = summary(m)
    assert f"{m['cores']} cores" in line and f"torch {m['versions']['torch']}" in line and "\n" not in line
