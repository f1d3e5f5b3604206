"""A compiled CPU filter for the common case: many series, scalar observations, no gradients.

The sequential filter in torch runs a few small ops per step from Python; on a CPU most of its
time is op dispatch, not arithmetic (1,000 series x 1,000 steps of a local linear trend take
~0.1 s, of which a few ms are flops). This module compiles a small C kernel (once, with the
system's C compiler, cached under ``~/.cache/tsssm``) that runs the same algorithm as
:func:`tsssm.kalman.filter.covariance_pass` + the mean recursion + :func:`finish`:

1. per distinct model (the broadcast batch of F, Q, H, R, P0): the Riccati recursion with the
   expanded Joseph update for a scalar observation, stopping at its fixed point (to 64 ulps,
   as the torch path) and repeating the last step from there;
2. per series: predicted mean, predicted observation, innovation, filtered mean, log-likelihood
   terms and NIS, in one pass over its steps.

The kernel checks the data on its way through (a NaN sends the call back to the torch path,
which handles missing values; +-inf is reported as the torch path reports it).

It is used by ``kalman_filter(..., method="sequential")`` when every condition holds: CPU
float32/float64 tensors, nothing requires a gradient (or grad mode is off), one observed
channel (p = 1), no missing value, a time-invariant model without controls or intercepts.
Otherwise, or when no C compiler is available (the torch path runs, with a debug log line),
nothing changes. ``TSSSM_CPU_KERNEL=0`` switches it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

typedef REAL real;
#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUFFIX)

/* Ask for transparent huge pages on [p, p + bytes) before it is first written: a fresh
   buffer of tens of MB otherwise costs one page fault per 4 KB. A no-op where unsupported. */
void FN(advise_huge)(void *p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t b = ((uintptr_t)p + (uintptr_t)bytes) & ~(huge - 1);
    if (b > a) madvise((void *)a, b - a, MADV_HUGEPAGE);
#else
    (void)p; (void)bytes;
#endif
}

/* Riccati recursion for nm models with a scalar observation, all matrices row-major:
   F, Q, P0 (nm, n, n), H (nm, n), R (nm). Writes Ppred, Pfilt (nm, T, n, n), K (nm, T, n),
   S (nm, T) for the steps it computes. steady: stop at the fixed point
   (|P_t - P_{t-1}| <= tol max|P_{t-1}|, checked at every other computed step as the torch
   path does): every later step repeats the last computed one, which is not written again.
   Returns -1 when fine, else the first step whose innovation variance is not positive;
   n_computed[m]: steps computed and stored (the rest repeat the last of them),
   steady_from[m]: that repeated step or -1. */
int64_t FN(kalman_cov)(int64_t nm, int64_t T, int64_t n, const real *F, const real *H,
                       const real *Q, const real *R, const real *P0, real tol, int steady,
                       real *Ppred, real *Pfilt, real *K, real *S, int64_t *n_computed,
                       int64_t *steady_from, real *work) {
    int64_t nn = n * n;
    real *P = work, *FP = work + nn, *ph = work + 2 * nn, *k = work + 2 * nn + n;
    for (int64_t mi = 0; mi < nm; mi++) {
        const real *Fm = F + mi * nn, *Hm = H + mi * n, *Qm = Q + mi * nn;
        real r = R[mi];
        real *Pp = Ppred + mi * T * nn, *Pf = Pfilt + mi * T * nn;
        real *Km = K + mi * T * n, *Sm = S + mi * T;
        memcpy(P, P0 + mi * nn, nn * sizeof(real));
        int64_t computed = 0;
        steady_from[mi] = -1;
        for (int64_t t = 0; t < T; t++) {
            if (t > 0) {  /* P = F P F' + Q, symmetrised */
                for (int64_t i = 0; i < n; i++)
                    for (int64_t j = 0; j < n; j++) {
                        real acc = 0;
                        for (int64_t l = 0; l < n; l++) acc += Fm[i * n + l] * P[l * n + j];
                        FP[i * n + j] = acc;
                    }
                for (int64_t i = 0; i < n; i++)
                    for (int64_t j = 0; j < n; j++) {
                        real acc = Qm[i * n + j];
                        for (int64_t l = 0; l < n; l++) acc += FP[i * n + l] * Fm[j * n + l];
                        P[i * n + j] = acc;
                    }
                for (int64_t i = 0; i < n; i++)
                    for (int64_t j = 0; j < i; j++) {
                        real a = 0.5 * (P[i * n + j] + P[j * n + i]);
                        P[i * n + j] = a;
                        P[j * n + i] = a;
                    }
            }
            if (steady && t >= 2 && T - t > 2 && computed % 2 == 0) {
                const real *prev = Pp + (t - 1) * nn;
                real scale = 0, diff = 0;
                for (int64_t i = 0; i < nn; i++) {
                    real a = fabs(prev[i]), d = fabs(P[i] - prev[i]);
                    if (a > scale) scale = a;
                    if (d > diff) diff = d;
                }
                if (diff <= tol * scale) {  /* steps t .. T-1 repeat step t-1: not stored */
                    steady_from[mi] = t - 1;
                    break;
                }
            }
            memcpy(Pp + t * nn, P, nn * sizeof(real));
            real s = r;
            for (int64_t i = 0; i < n; i++) {
                real acc = 0;
                for (int64_t l = 0; l < n; l++) acc += P[i * n + l] * Hm[l];
                ph[i] = acc;
                s += Hm[i] * acc;
            }
            if (!(s > 0)) return t;
            for (int64_t i = 0; i < n; i++) k[i] = ph[i] / s;
            /* expanded Joseph form for a scalar observation: P - k a' - a k' + s k k' */
            for (int64_t i = 0; i < n; i++)
                for (int64_t j = 0; j < n; j++)
                    P[i * n + j] += -k[i] * ph[j] - ph[i] * k[j] + s * k[i] * k[j];
            for (int64_t i = 0; i < n; i++)
                for (int64_t j = 0; j < i; j++) {
                    real a = 0.5 * (P[i * n + j] + P[j * n + i]);
                    P[i * n + j] = a;
                    P[j * n + i] = a;
                }
            memcpy(Pf + t * nn, P, nn * sizeof(real));
            memcpy(Km + t * n, k, n * sizeof(real));
            Sm[t] = s;
            computed++;
        }
        n_computed[mi] = computed;
    }
    return -1;
}

/* Means, innovations and log-likelihood of ns series y (ns, T), series s using model
   midx[s]: F (nm, n, n), H (nm, n), gains K (nm, Tk, n), innovation variances S (nm, Tk),
   log S (nm, Tk), of which model m stores nk[m] steps (later steps repeat its last);
   m0 (ns, n). Outputs: mpred, mfilt (ns, T, n), yhat, v, ll, nis (ns, T) (each may be
   NULL: not written), loglik (ns). Series run in blocks of B at once, the
   innermost loop over the block: independent recursions the CPU overlaps (and vectorises).
   Returns -1, or the flat index s * T + t of a value of y that is not finite (then the
   outputs are incomplete: the caller falls back or reports it). */
#define B 8
int64_t FN(kalman_means)(int64_t ns, int64_t T, int64_t n, const int64_t *midx, const real *y,
                      const real *F, const real *H, int64_t Tk, const int64_t *nk,
                      const real *K, const real *S, const real *logS, const real *m0,
                      real *mpred, real *mfilt, real *yhat, real *v, real *ll, real *nis,
                      real *loglik) {
    const real half_log_2pi = (real)0.91893853320467274178;
    real m[64 * B], mp[64 * B], e[B], tot[B];
    int64_t s0 = 0;
    while (s0 < ns) {
        /* a block: consecutive series that share one model */
        int64_t mi = midx[s0], nb = 1;
        while (nb < B && s0 + nb < ns && midx[s0 + nb] == mi) nb++;
        const real *Fm = F + mi * n * n, *Hm = H + mi * n, *Km = K + mi * Tk * n;
        const real *Sm = S + mi * Tk, *lSm = logS + mi * Tk;
        const int64_t last = nk[mi] - 1;
        for (int64_t b = 0; b < nb; b++) {
            tot[b] = 0;
            for (int64_t i = 0; i < n; i++) m[i * B + b] = m0[(s0 + b) * n + i];
        }
        for (int64_t t = 0; t < T; t++) {
            if (t > 0) {
                for (int64_t i = 0; i < n; i++) {
                    for (int64_t b = 0; b < B; b++) mp[i * B + b] = 0;
                    for (int64_t l = 0; l < n; l++) {
                        real f = Fm[i * n + l];
                        if (f != 0)
                            for (int64_t b = 0; b < B; b++) mp[i * B + b] += f * m[l * B + b];
                    }
                }
            } else {
                for (int64_t i = 0; i < n * B; i++) mp[i] = m[i];
            }
            const int64_t tk = t < last ? t : last;
            real sinv = 1 / Sm[tk], c = half_log_2pi + 0.5 * lSm[tk];
            const real *kt = Km + tk * n;
            for (int64_t b = 0; b < B; b++) e[b] = 0;
            for (int64_t i = 0; i < n; i++) {
                real h = Hm[i];
                if (h != 0)
                    for (int64_t b = 0; b < B; b++) e[b] += h * mp[i * B + b];
            }
            for (int64_t b = 0; b < nb; b++) {
                int64_t at = (s0 + b) * T + t;
                real yh = e[b];
                if (!isfinite(y[at])) return at;
                e[b] = y[at] - yh;
                real w = e[b] * e[b] * sinv;
                real l = -(c + 0.5 * w);
                tot[b] += l;
                if (yhat) yhat[at] = yh;
                if (v) v[at] = e[b];
                if (nis) nis[at] = w;
                if (ll) ll[at] = l;
            }
            for (int64_t i = 0; i < n; i++) {
                real k = kt[i];
                for (int64_t b = 0; b < B; b++) m[i * B + b] = mp[i * B + b] + k * e[b];
            }
            if (mpred)
                for (int64_t b = 0; b < nb; b++)
                    for (int64_t i = 0; i < n; i++)
                        mpred[((s0 + b) * T + t) * n + i] = mp[i * B + b];
            if (mfilt)
                for (int64_t b = 0; b < nb; b++)
                    for (int64_t i = 0; i < n; i++)
                        mfilt[((s0 + b) * T + t) * n + i] = m[i * B + b];
        }
        for (int64_t b = 0; b < nb; b++) loglik[s0 + b] = tot[b];
        s0 += nb;
    }
    return -1;
}
"""

#: largest state dimension the kernel's stack buffers hold
MAX_STATES = 64
_SUFFIX = {torch.float64: "f64", torch.float32: "f32"}
_CTYPE = {torch.float64: ctypes.c_double, torch.float32: ctypes.c_float}
_libs: dict[torch.dtype, ctypes.CDLL | None] = {}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tsssm" / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc.split()[0]):
            return cc
    return None


def _build(dtype: torch.dtype) -> ctypes.CDLL | None:
    suffix = _SUFFIX[dtype]
    real = "double" if dtype == torch.float64 else "float"
    flags = ["-O3", "-shared", "-fPIC", "-fno-fast-math", f"-DREAL={real}", f"-DSUFFIX={suffix}"]
    key = hashlib.sha256((SOURCE + " ".join(flags) + sys.platform).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kalman_{suffix}_{key}.so"
    if not target.exists():
        cc = _compiler()
        if cc is None:
            log.debug("no C compiler found: the Kalman filter uses its torch path on the CPU")
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "kalman.c"
            src.write_text(SOURCE)
            out = Path(tmp) / target.name
            proc = subprocess.run([*cc.split(), *flags, str(src), "-o", str(out), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                log.debug("compiling the CPU Kalman kernel failed: %s", proc.stderr[-500:])
                return None
            os.replace(out, target)  # atomic: concurrent builders agree on the result
    lib = ctypes.CDLL(str(target))
    ptr, i64, real_t = ctypes.c_void_p, ctypes.c_int64, _CTYPE[dtype]
    cov = getattr(lib, f"kalman_cov_{suffix}")
    cov.restype = i64
    cov.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, real_t, ctypes.c_int, ptr, ptr,
                    ptr, ptr, ptr, ptr, ptr]
    means = getattr(lib, f"kalman_means_{suffix}")
    means.restype = i64
    advise = getattr(lib, f"advise_huge_{suffix}")
    advise.restype = None
    advise.argtypes = [ptr, i64]
    means.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                      ptr, ptr, ptr, ptr, ptr]
    return lib


def library(dtype: torch.dtype) -> ctypes.CDLL | None:
    """The compiled kernel for ``dtype`` (built on first use), or None when unavailable."""
    if os.environ.get("TSSSM_CPU_KERNEL", "1") == "0" or dtype not in _SUFFIX:
        return None
    if dtype not in _libs:
        try:
            _libs[dtype] = _build(dtype)
        except (OSError, subprocess.SubprocessError) as err:
            log.debug("the CPU Kalman kernel is unavailable: %s", err)
            _libs[dtype] = None
    return _libs[dtype]


def _p(x: Tensor) -> int:
    return x.data_ptr()


class Riccati(NamedTuple):
    """The covariance recursion of nm models, stored up to its fixed point."""

    predicted_cov: Tensor  # (nm, Tk, n, n)
    filtered_cov: Tensor  # (nm, Tk, n, n)
    gain: Tensor  # (nm, Tk, n)
    innovation_var: Tensor  # (nm, Tk)
    stored: Tensor  # (nm,) int64: steps stored per model; later steps repeat the last one

    def full(self, x: Tensor, T: int) -> Tensor:
        """A stored field (nm, Tk, ...) over all T steps (the repeats materialised)."""
        idx = torch.arange(T).unsqueeze(0).minimum(self.stored.unsqueeze(1) - 1)  # (nm, T)
        idx = idx.reshape(*idx.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
        return x.gather(1, idx)

    def last(self, x: Tensor) -> Tensor:
        """A stored field at the last step (nm, ...)."""
        idx = (self.stored - 1).reshape(-1, 1, *([1] * (x.ndim - 2)))
        return x.gather(1, idx.expand(-1, 1, *x.shape[2:]))[:, 0]


def riccati(F: Tensor, H: Tensor, Q: Tensor, R: Tensor, P0: Tensor, T: int, tol: float,
            steady: bool) -> Riccati | int:
    """The covariance recursion of nm models: F, Q, P0 (nm, n, n), H (nm, n), R (nm,),
    contiguous, one dtype. Returns the steps up to the fixed point (:class:`Riccati`), or the
    first step whose innovation variance is not positive."""
    lib = library(F.dtype)
    nm, n = F.shape[0], F.shape[-1]
    dt = F.dtype
    # untouched pages of these buffers cost nothing: only the computed steps are written
    Ppred = torch.empty(nm, T, n, n, dtype=dt)
    Pfilt = torch.empty_like(Ppred)
    K = torch.empty(nm, T, n, dtype=dt)
    S = torch.empty(nm, T, dtype=dt)
    computed = torch.empty(nm, dtype=torch.int64)
    steady_from = torch.empty(nm, dtype=torch.int64)
    work = torch.empty(2 * n * n + 2 * n, dtype=dt)
    fn = getattr(lib, f"kalman_cov_{_SUFFIX[dt]}")
    bad = fn(nm, T, n, _p(F), _p(H), _p(Q), _p(R), _p(P0), tol, int(steady), _p(Ppred),
             _p(Pfilt), _p(K), _p(S), _p(computed), _p(steady_from), _p(work))
    if bad >= 0:
        return int(bad)
    Tk = int(computed.max())
    return Riccati(Ppred[:, :Tk], Pfilt[:, :Tk], K[:, :Tk].contiguous(),
                   S[:, :Tk].contiguous(), computed)


def means(F: Tensor, H: Tensor, cov: Riccati, m0: Tensor, y: Tensor, midx: Tensor,
          outputs: bool = True) -> tuple[Tensor | None, ...] | int:
    """Means and likelihood terms of ns series y (ns, T) (see the C source) with the gains of
    ``cov``; m0 (ns, n), midx (ns,) int64 model index of each series. Returns (m_pred,
    m_filt (ns, T, n), y_hat, innovation, log_liks, nis (ns, T), loglik (ns,)); with
    ``outputs=False`` only the log-likelihood is computed (the others are None). A value of
    y that is not finite stops it: then the flat index (s * T + t) of that value is
    returned instead."""
    lib = library(y.dtype)
    ns, T = y.shape
    n = F.shape[-1]
    dt = y.dtype
    K, S = cov.gain, cov.innovation_var
    logS = S.log()
    if outputs:  # one buffer (one page-fault-friendly allocation), split into the outputs
        size = ns * T
        buf = torch.empty(size * (2 * n + 4), dtype=dt)
        getattr(lib, f"advise_huge_{_SUFFIX[dt]}")(buf.data_ptr(), buf.numel() * buf.element_size())
        parts = buf.split([size * n, size * n, size, size, size, size])
        mpred, mfilt = parts[0].view(ns, T, n), parts[1].view(ns, T, n)
        yhat, v, ll, nis = (x.view(ns, T) for x in parts[2:])
    else:
        mpred = mfilt = yhat = v = ll = nis = None
    loglik = torch.empty(ns, dtype=dt)

    def ptr(x: Tensor | None) -> int | None:
        return None if x is None else x.data_ptr()

    fn = getattr(lib, f"kalman_means_{_SUFFIX[dt]}")
    bad = fn(ns, T, n, _p(midx), _p(y), _p(F), _p(H), K.shape[1], _p(cov.stored), _p(K), _p(S),
             _p(logS), _p(m0), ptr(mpred), ptr(mfilt), ptr(yhat), ptr(v), ptr(ll), ptr(nis),
             _p(loglik))
    if bad >= 0:
        return int(bad)
    return mpred, mfilt, yhat, v, ll, nis, loglik
