"""How close each comparison came to its tolerance: a pytest plugin, off unless asked for.

    cd tests && python -m pytest -p tolerance_probe [...]       # appends one JSON line per comparison
    python tests/tolerance_probe.py [FILE]                        # the worst error against each bound

Every ``helpers.assert_close`` and ``helpers.assert_lse_close`` call is recorded (test id, tolerance, measured error,
dtype, element count) to ``$MLA_TOL_PROBE`` (default ``tolerance_probe.jsonl`` in the working directory), then runs
unchanged: the plugin never changes a verdict. Run it where the numerics differ (natively on a GPU: tensor-core
accumulation, approximate exp2/log2) to see how much room each bound leaves there; the figures behind the bounds in
``helpers.py`` came from it (``bench/NOTES.md`` section 30). Safe under pytest-xdist: each worker appends whole lines.
"""

from __future__ import annotations

import json
import math
import os
import sys

PATH_ENV = "MLA_TOL_PROBE"


def _record(kind: str, name: str, err: float, tol: float, dtype, n: int, default: bool) -> None:
    line = json.dumps(dict(kind=kind, test=os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0], name=name,
                           err=err, tol=tol, dtype=str(dtype).replace("torch.", ""), n=n, default=default))
    with open(os.environ.get(PATH_ENV, "tolerance_probe.jsonl"), "a") as f:
        f.write(line + "\n")


def _install() -> None:
    import torch

    import helpers

    close, lse_close = helpers.assert_close, helpers.assert_lse_close

    def assert_close(name, actual, expected, dtype, rms_tol=None, cos_tol=None):
        try:  # (whatever goes wrong here, the check below still runs and decides)
            a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
            fin = torch.isfinite(e)
            n = int(fin.sum()) if a.shape == e.shape else 0
            if n:
                tol = helpers.rms_tol_for(dtype, n) if rms_tol is None else rms_tol
                _record("rms", name, helpers.err_ratio(a[fin], e[fin]), tol, dtype, n, rms_tol is None)
        except Exception as exc:  # noqa: BLE001
            print(f"tolerance_probe: {name}: not recorded ({exc!r})", file=sys.stderr)
        return close(name, actual, expected, dtype, rms_tol, cos_tol)

    def assert_lse_close(name, actual, expected, atol=helpers.LSE_ATOL):
        try:
            n = int(torch.isfinite(expected).sum()) if actual.shape == expected.shape else 0
            if n:
                worst, scale = helpers.lse_error(actual, expected)  # the check's own measure
                _record("lse", name, worst / scale, atol, actual.dtype, n, atol == helpers.LSE_ATOL)
        except Exception as exc:  # noqa: BLE001
            print(f"tolerance_probe: {name}: not recorded ({exc!r})", file=sys.stderr)
        return lse_close(name, actual, expected, atol)

    helpers.assert_close, helpers.assert_lse_close = assert_close, assert_lse_close


def pytest_configure(config):  # before collection: the test modules import the wrapped functions
    _install()


def summary(path: str) -> list[str]:
    """One line per (kind, dtype, tolerance): comparisons, the worst error over its tolerance, and where."""
    groups: dict = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            key = (r["kind"], r["dtype"], "default" if r["default"] else f"given {r['tol']:.3g}")
            groups.setdefault(key, []).append(r)
    lines = []
    for (kind, dtype, tol), rows in sorted(groups.items()):
        # a NaN error (a result NaN where the reference is finite: a check that failed) ranks worst and sorts last:
        # NaN compares false both ways, so max() kept the first row it met and sorted() left NaN where it lay
        worst = max(rows, key=lambda r: math.inf if math.isnan(r["err"]) else r["err"] / r["tol"])
        errs = sorted((r["err"] for r in rows), key=lambda e: (math.isnan(e), e))
        lines.append(f"{kind} {dtype} {tol}: {len(rows)} comparisons, median error {errs[len(errs) // 2]:.2e}, "
                     f"worst {worst['err']:.2e} = {worst['err'] / worst['tol']:.3f} of its bound {worst['tol']:.2e} "
                     f"(n={worst['n']}, {worst['test']}: {worst['name']})")
    return lines


if __name__ == "__main__":
    print("\n".join(summary(sys.argv[1] if len(sys.argv) > 1 else "tolerance_probe.jsonl")))
