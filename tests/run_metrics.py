"""Comparing the metrics of two training runs that must agree (a resumed run and the run that
never stopped)."""
import pytest


def deterministic(record):
    """What must repeat exactly: everything but wall-clock figures and the engine/trainer
    mismatch, which is float noise (~2e-7 here) that depends on how the engine happened to
    batch the requests together (see `same_metrics`)."""
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/", "mismatch/"))}


def same_metrics(ours, theirs):
    """Deterministic metrics equal (to float round-off); the mismatch within its noise."""
    assert deterministic(ours) == pytest.approx(deterministic(theirs), rel=1e-6, abs=1e-9), ours["step"]
    noise = {k: v for k, v in ours.items() if k.startswith("mismatch/")}
    assert noise == pytest.approx({k: theirs[k] for k in noise}, abs=1e-6), ours["step"]
