"""How the export side judges that two implementations agree (ONNX Runtime vs eager PyTorch,
our decoder wrappers vs transformers' forward): relative to the magnitude compared, plus
what matters for captioning, the tokens.

FP32 differences between two correct implementations grow with the activations: trained
decoders have logits in the tens to hundreds and a few residual dimensions in the hundreds
or more. Measured on realistically scaled test models (logits ~100, residual dims at 400):
correct exports differ by 4e-7 to 3e-6 of each output's largest |value|, a BLIP export by
2.4e-4 in absolute terms. A fixed absolute bound refused such checkpoints; this one does not.
"""

from dataclasses import asdict, dataclass

import numpy as np


class ExportError(Exception):
    """An export or quantization that cannot go on; the message is one line naming the cause."""


@dataclass(frozen=True)
class Tolerance:
    """Per output, numpy.allclose's form scaled by the reference's largest |value|:
    |got - want| <= atol + rtol * max|want|. The default rtol leaves 30-200x headroom over the
    FP32 differences measured on correct exports, and refuses a KV-cache position off by one."""

    rtol: float = 1e-4
    atol: float = 1e-5

    def bound(self, scale: float) -> float:
        """The allowed difference for values whose largest |value| is `scale`."""
        return self.atol + self.rtol * scale


@dataclass
class Agreement:
    """The worst absolute and relative difference seen (relative to max|reference| of the
    output it was seen in), and how many logit rows and greedy samples agreed."""

    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    argmax_rows: int = 0
    greedy_tokens: int = 0

    def summary(self) -> str:
        return f"max |diff| {self.max_abs_diff:.1e} (relative {self.max_rel_diff:.1e})"

    def record(self, tol: Tolerance) -> dict:
        return {**asdict(self), "rtol": tol.rtol, "atol": tol.atol}


ADVICE = ("if the model itself is right and only large, pass a looser --rtol/--atol "
          "(README: Bring your own captioner); otherwise the graph computes something else")


def compare(what: str, names: list[str], got: list[np.ndarray], want: list[np.ndarray], tol: Tolerance,
            seen: Agreement) -> None:
    """Each output within the tolerance; raise ExportError naming the output, where, and by how much."""
    for name, g, w in zip(names, got, want, strict=True):
        if not w.size:
            continue
        diff = np.abs(g.astype(np.float64) - w)
        scale = float(np.abs(w).max())
        worst = np.unravel_index(np.argmax(np.nan_to_num(diff, nan=np.inf)), diff.shape)
        abs_diff = float(diff[worst])
        rel_diff = abs_diff / scale if scale else abs_diff
        if not abs_diff <= tol.bound(scale):  # NaN fails too
            raise ExportError(f"{what}: {name} differs by {abs_diff:.2e} (relative {rel_diff:.2e} of max |value| "
                              f"{scale:.3g}) at index {tuple(int(i) for i in worst)}, beyond atol {tol.atol:g} + "
                              f"rtol {tol.rtol:g}; {ADVICE}")
        seen.max_abs_diff, seen.max_rel_diff = max(seen.max_abs_diff, abs_diff), max(seen.max_rel_diff, rel_diff)


def compare_argmax(what: str, got: np.ndarray, want: np.ndarray, tol: Tolerance, seen: Agreement) -> None:
    """The next token at every position agrees; a differing pick is accepted only where the
    reference itself scores the two within the tolerance (a tie that rounding may break)."""
    rows_got, rows_want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
    picked, wanted = rows_got.argmax(-1), rows_want.argmax(-1)
    for row in np.flatnonzero(picked != wanted):
        margin = float(rows_want[row, wanted[row]] - rows_want[row, picked[row]])
        if not margin <= tol.bound(float(np.abs(rows_want[row]).max())):
            raise ExportError(f"{what}: the next token differs at row {int(row)} ({int(picked[row])} instead of "
                              f"{int(wanted[row])}, which leads by {margin:.2e}); {ADVICE}")
    seen.argmax_rows += len(picked)
