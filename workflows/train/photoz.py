"""Train the photo-z model: a deep ensemble of mixture density networks, exported to ONNX.

``surveypipe train photoz --catalog FILE --out MODEL_DIR [--mapping MAPPING.yaml | flags]`` trains
on any FITS / Parquet / HDF5 catalogue with spectroscopic (or true) redshifts;
``surveypipe train photoz --mock --out MODEL_DIR`` builds the mock survey's own catalogues first
(simulated releases run through the pipeline, measured photometry matched to truth; training
seeds 1000-1019, card metrics on validation seeds 2000-2005; cached under ``--workdir``, default
``out/photoz_mock``) -- what ``make models`` runs. A cached catalogue is used as it is, whichever
pipeline version measured it (the log says so when its pipeline fingerprint differs from the
current classical stages'); delete it to rebuild. With ``--mock`` every training-seed row is
trained on and the validation seeds early-stop and calibrate (``--early-stop holdout``; the card's
hold-out metrics are on those same seeds -- the benchmark seeds 9000-9005 are never seen).

Model. Inputs are the standardised features of :mod:`workflows.photoz_data` (asinh magnitudes,
their errors, adjacent asinh colours, missing-band indicators). Each of ``members`` MLPs
(SiLU) outputs a ``components``-Gaussian mixture in ``u = ln(1 + z)``; every member is trained by
its own negative log-likelihood (deep ensemble, Lakshminarayanan et al. 2017), with random
band dropout so missing bands are learnt from the indicators. The ensemble's p(z) is the equal-
weight mixture of all members' mixtures (model uncertainty widens it where members disagree). A
single width factor for every sigma is then fitted by likelihood on the validation split.

ONNX graph: ``features (N, F) float32 -> prob (N, G), weight (N, M*K), mu (N, M*K), sigma (N, M*K),
cdf (N, G+1)``; ``prob`` is the probability of each bin of the card's z grid, the mixture integrated
exactly over each bin (erf at the bin edges), renormalised over [z_min, z_max] (``sum(prob) = 1``);
the density on the grid's bin centres is ``prob / dz``; ``cdf`` is the same renormalised mixture
CDF at the G+1 bin edges (0 ... 1; ``diff(cdf)`` = ``prob`` up to rounding), what the stage reads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from workflows import photoz_data as pzd

MODEL_NAME = "photoz"
MODEL_VERSION = "1"
DEFAULT_WORKDIR = Path("out/photoz_mock")
DEFAULT_FLUX_KINDS = "psf,ap03,ap06,kron"   # several measurements per band: a few % better than psf alone
DEFAULT_TRAIN_SEEDS = "1000-1019"   # one 2048x2048-pixel ugrizy release per seed (~3200 galaxies each)
DEFAULT_VAL_SEEDS = "2000-2005"


@dataclass
class TrainSettings:
    members: int = 4
    components: int = 3          # 4 x 3 = 12 Gaussians: the p(z) grid cost in the graph scales with it
    hidden: tuple[int, ...] = (64, 64, 64)
    epochs: int = 300
    patience: int = 20
    batch: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-5
    val_frac: float = 0.15
    seed: int = 1234
    band_dropout: float = 0.10   # fraction of training rows that lose a random subset of bands
    sigma_min: float = 0.002     # in u = ln(1+z)
    z_min: float = 0.0
    z_max: float = 4.0
    dz: float = 0.02
    threads: int = 1
    calibrate: bool = True
    max_minutes: float = 0.0     # 0: no wall-clock cap
    crps_weight: float = 0.0     # > 0: loss = NLL + crps_weight * CRPS (in u) per member
    early_stop: str = "split"    # "split": carve val_frac of the training rows; "holdout": train on every
                                 # training row, early-stop and calibrate on the separate hold-out catalogue
    flux_noise: float = 0.0      # > 0: every training batch redraws each measured flux as f + flux_noise * err * N(0, 1)
                                 # (per member; features recomputed from the noisy fluxes): input-noise augmentation
    dropout: float = 0.0         # dropout rate after every hidden layer (training only)
    schedule: str = "plateau"    # "plateau": halve lr when the validation NLL stalls; "cosine": cosine decay over epochs

    @property
    def edges(self) -> np.ndarray:
        n = int(round((self.z_max - self.z_min) / self.dz))
        return np.round(self.z_min + self.dz * np.arange(n + 1), 10)


# ---------------------------------------------------------------------------- the network
def build_model(n_features: int, bands: Sequence[str], s: TrainSettings, u_mean: float, u_std: float):
    """The ensemble as one torch module (members as batched weights: fast to train and export)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class EnsembleLinear(nn.Module):
        def __init__(self, m: int, n_in: int, n_out: int):
            super().__init__()
            bound = 1.0 / math.sqrt(n_in)
            self.weight = nn.Parameter(torch.empty(m, n_in, n_out).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(m, 1, n_out).uniform_(-bound, bound))

        def forward(self, x):  # x (M, N, in) or (N, in)
            return torch.matmul(x, self.weight) + self.bias

    class PhotoZEnsemble(nn.Module):
        def __init__(self):
            super().__init__()
            M, K = s.members, s.components
            self.M, self.K = M, K
            sizes = [n_features, *s.hidden]
            self.layers = nn.ModuleList(EnsembleLinear(M, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
            self.head = EnsembleLinear(M, sizes[-1], 3 * K)
            with torch.no_grad():  # start with spread-out component means and moderate widths
                self.head.weight.mul_(0.1)
                self.head.bias.zero_()
                self.head.bias[:, :, K:2 * K] = torch.linspace(-1.5, 1.5, K)
            edges = torch.tensor(np.log1p(s.edges), dtype=torch.float32)
            self.register_buffer("u_edges", edges)
            self.u_lo, self.u_hi = float(edges[0]), float(edges[-1])
            self.register_buffer("u_mean", torch.tensor(float(u_mean)))
            self.register_buffer("u_std", torch.tensor(float(u_std)))
            self.register_buffer("sigma_min", torch.tensor(float(s.sigma_min)))
            self.register_buffer("width", torch.tensor(1.0))       # calibration factor on every sigma

        def mixture(self, x):
            """Per member: log weights, means and sigmas in u, each (M, N, K)."""
            h = x
            for layer in self.layers:
                h = F.silu(layer(h))
                if s.dropout > 0 and self.training:
                    h = F.dropout(h, p=s.dropout, training=True)
            o = self.head(h)
            K = self.K
            logw = torch.log_softmax(o[..., :K], dim=-1)
            mu = self.u_mean + self.u_std * o[..., K:2 * K]
            sigma = (self.sigma_min + self.u_std * F.softplus(o[..., 2 * K:] - 1.0)) * self.width
            return logw, mu, sigma

        def forward(self, x):
            logw, mu, sigma = self.mixture(x)
            n = x.shape[0]
            w = (torch.exp(logw) / self.M).permute(1, 0, 2).reshape(n, self.M * self.K)
            mu = mu.permute(1, 0, 2).reshape(n, self.M * self.K)
            sigma = sigma.permute(1, 0, 2).reshape(n, self.M * self.K)
            # standardised edges t = (u_edge - mu) / (sigma sqrt 2), the mixture CDF (x2 - 1) at the
            # edges as one weighted sum, then the bin masses: 3 passes over the (N, MK, G+1) block,
            # the cost that dominates the graph
            # component centres are clipped to the grid for the binned p(z) (a mean beyond the grid
            # would leave only rounding noise to normalise); the mixture outputs stay unclipped
            inv = 1.0 / (sigma * math.sqrt(2.0))
            mu_in = torch.clamp(mu, min=self.u_lo, max=self.u_hi)
            # t as one GEMM, [inv, -mu inv] (N MK, 2) @ [[u_edges], [1]] (2, G+1): a single pass
            # writing the (N, MK, G+1) block instead of a broadcast Sub and Mul
            E = self.u_edges.shape[0]
            coef = torch.stack([inv, -mu_in * inv], dim=-1).reshape(n * self.M * self.K, 2)
            rhs = torch.stack([self.u_edges, torch.ones_like(self.u_edges)], dim=0)
            t = torch.matmul(coef, rhs).reshape(n, self.M * self.K, E)
            cdf = torch.matmul(w.unsqueeze(1), torch.erf(t)).squeeze(1)     # (N, G+1)
            mass = torch.clamp(cdf[:, 1:] - cdf[:, :-1], min=0.0)            # (N, G)
            prob = mass / torch.clamp(mass.sum(dim=1, keepdim=True), min=1e-30)
            # the same CDF at the G+1 edges, 0 at z_min and 1 at z_max: the stage's quantiles are
            # binary searches in it (a cumulative sum over the grid costs more than the whole graph)
            lo = cdf[:, :1]
            cdf01 = (cdf - lo) / torch.clamp(cdf[:, -1:] - lo, min=1e-30)
            return prob, w, mu, sigma, cdf01

    return PhotoZEnsemble()


def member_nll(model, x, u):
    """Mean NLL in u of every member, (M,), for inputs (M, N, F) or (N, F) and targets u (N,)."""
    import torch

    logw, mu, sigma = model.mixture(x)
    zs = (u.view(1, -1, 1) - mu) / sigma
    logp = logw - 0.5 * zs * zs - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    return -torch.logsumexp(logp, dim=-1).mean(dim=-1)


def member_crps(model, x, u):
    """Mean CRPS in u of every member's Gaussian mixture, (M,) (closed form, Grimit et al. 2006)."""
    import torch

    logw, mu, sigma = model.mixture(x)
    w = torch.exp(logw)

    def a(m, s):  # E|X| for X ~ N(m, s^2)
        t = m / s
        return s * math.sqrt(2 / math.pi) * torch.exp(-0.5 * t * t) + m * torch.erf(t / math.sqrt(2))

    t1 = (w * a(u.view(1, -1, 1) - mu, sigma)).sum(-1)
    dm = mu.unsqueeze(-1) - mu.unsqueeze(-2)
    ds = torch.sqrt(sigma.unsqueeze(-1) ** 2 + sigma.unsqueeze(-2) ** 2)
    t2 = (w.unsqueeze(-1) * w.unsqueeze(-2) * a(dm, ds)).sum((-1, -2))
    return (t1 - 0.5 * t2).mean(dim=-1)


def ensemble_nll(model, x, u, width: float | None = None):
    """Mean NLL in u of the equal-weight ensemble mixture (optionally at another sigma width)."""
    import torch

    logw, mu, sigma = model.mixture(x)
    if width is not None:
        sigma = sigma / model.width * width
    zs = (u.view(1, -1, 1) - mu) / sigma
    logp = logw - 0.5 * zs * zs - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    M = logp.shape[0]
    lp = torch.logsumexp(logp.permute(1, 0, 2).reshape(logp.shape[1], -1), dim=-1) - math.log(M)
    return -lp.mean()


def band_feature_maps(bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(Bb, F) 0/1 maps per *base* band (every flux set of it): which features its absence blanks,
    and its indicator columns."""
    names = pzd.feature_names(bands)
    base = list(dict.fromkeys(pzd.split_band(b)[0] for b in bands))
    B, F = len(bands), len(names)
    pairs = pzd.colour_pairs(bands)
    blank = np.zeros((len(base), F), np.float32)
    ind = np.zeros((len(base), F), np.float32)
    for j, b in enumerate(bands):
        k = base.index(pzd.split_band(b)[0])
        blank[k, j] = blank[k, B + j] = 1.0
        for c, (i1, i2) in enumerate(pairs):
            if j in (i1, i2):
                blank[k, 2 * B + c] = 1.0
        ind[k, 2 * B + len(pairs) + j] = 1.0
    return blank, ind


def pipeline_columns(bands: Sequence[str], flux_kind: str = "kron") -> dict[str, dict[str, str]]:
    """Pipeline ``objects`` columns of each model band: ``g`` -> ``g_{flux_kind}Flux``, ``g@ap03`` -> ``g_ap03Flux``."""
    out = {}
    for b in bands:
        base, fset = pzd.split_band(b)
        kind = fset or flux_kind.split(",")[0].strip()
        out[b] = {"flux": f"{base}_{kind}Flux", "err": f"{base}_{kind}FluxErr"}
    return out


# ---------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    model: Any
    norm: dict[str, Any]
    settings: TrainSettings
    history: list[dict[str, float]] = field(default_factory=list)
    epochs: int = 0
    best_epoch: int = 0
    seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0
    width: float = 1.0
    val_idx: np.ndarray | None = None


def split_holdout(n: int, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = max(1, int(round(frac * n))) if n > 1 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def usable_rows(phot: pzd.Photometry, s: TrainSettings, log: Any = print, what: str = "train") -> pzd.Photometry:
    """Rows with a redshift inside the grid and at least 2 usable bands."""
    if phot.z is None:
        raise ValueError("training needs redshifts")
    ok = np.isfinite(phot.z) & (phot.z >= s.z_min) & (phot.z < s.z_max)
    if not ok.all():
        log(f"{what}: dropping {int((~ok).sum())} rows with redshift outside [{s.z_min}, {s.z_max}) or not finite")
        phot = phot.take(np.flatnonzero(ok))
    usable = (phot.status != pzd.MISSING).sum(axis=1) >= 2
    if not usable.all():
        log(f"{what}: dropping {int((~usable).sum())} rows with fewer than 2 usable bands")
        phot = phot.take(np.flatnonzero(usable))
    return phot


def train(phot: pzd.Photometry, s: TrainSettings, log: Any = print, holdout: pzd.Photometry | None = None) -> TrainResult:
    """Fit normalisation and the ensemble on ``phot``.

    ``s.early_stop == "split"`` (or no ``holdout``): a validation split of ``val_frac`` is carved from
    ``phot`` for early stopping and the width calibration; ``"holdout"``: every row of ``phot`` is
    trained on and ``holdout`` (a separate catalogue, same bands) early-stops and calibrates.
    """
    import torch

    torch.set_num_threads(max(1, s.threads))
    torch.manual_seed(s.seed)
    phot = usable_rows(phot, s, log)
    n = len(phot)
    if n < 20:
        raise ValueError(f"training catalogue too small ({n} usable rows)")
    use_hold = s.early_stop == "holdout" and holdout is not None and len(holdout) > 0
    if use_hold:
        hold = usable_rows(holdout.reorder(phot.bands), s, log, what="early-stopping hold-out")
        tr_idx, va_idx = np.arange(n), None
    else:
        tr_idx, va_idx = split_holdout(n, s.val_frac, s.seed)
    norm = pzd.fit_normalisation(phot.flux[tr_idx], phot.err[tr_idx], phot.bands)
    X = pzd.features(phot.flux, phot.err, norm)
    U = np.log1p(phot.z).astype(np.float32)
    u_mean, u_std = float(U[tr_idx].mean()), float(max(U[tr_idx].std(), 0.05))
    model = build_model(X.shape[1], phot.bands, s, u_mean, u_std)
    Xt, Ut = torch.from_numpy(X[tr_idx]), torch.from_numpy(U[tr_idx])
    if use_hold:
        Xv = torch.from_numpy(pzd.features(hold.flux, hold.err, norm))
        Uv = torch.from_numpy(np.log1p(hold.z).astype(np.float32))
    else:
        Xv, Uv = torch.from_numpy(X[va_idx]), torch.from_numpy(U[va_idx])
    blank, ind = (torch.from_numpy(a) for a in band_feature_maps(phot.bands))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    if s.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, s.epochs), eta_min=s.lr * 0.01)
    elif s.schedule == "plateau":
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(2, s.patience // 4))
    else:
        raise ValueError(f"unknown schedule {s.schedule!r} (plateau or cosine)")
    noisy = None
    if s.flux_noise > 0:  # the training rows' fluxes, errors and usability, features rebuilt per batch
        fl, er = phot.flux[tr_idx], phot.err[tr_idx]
        ok = np.isfinite(fl) & np.isfinite(er) & (er > 0)
        noisy = TorchFeatures(norm)
        Ft = torch.from_numpy(np.where(ok, fl, 0.0).astype(np.float32))
        Et = torch.from_numpy(np.where(ok, er, 0.0).astype(np.float32))
        Ot = torch.from_numpy(ok)
    gen = torch.Generator().manual_seed(s.seed)
    M, B = s.members, blank.shape[0]  # dropout acts on base bands (all their flux sets)
    best, best_state, best_epoch, bad = float("inf"), None, 0, 0
    hist: list[dict[str, float]] = []
    t0 = time.perf_counter()
    log(f"train: {len(tr_idx)} training rows, {len(Xv)} "
        f"{'hold-out catalogue' if use_hold else 'validation split'} rows (early stopping), {X.shape[1]} features, bands "
        f"{','.join(phot.bands)}; ensemble of {M} MDNs x {s.components} Gaussians, hidden {list(s.hidden)}")
    epoch = 0
    for epoch in range(1, s.epochs + 1):
        model.train()
        perm = torch.randperm(len(Xt), generator=gen)
        tot, nb = 0.0, 0
        for i in range(0, len(perm), s.batch):
            idx = perm[i:i + s.batch]
            if noisy is not None:
                fb, eb, okb = Ft[idx], Et[idx], Ot[idx]
                fb = fb.unsqueeze(0) + s.flux_noise * eb.unsqueeze(0) * torch.randn(M, *fb.shape, generator=gen)
                xb = noisy(fb, eb.unsqueeze(0).expand(M, -1, -1), okb.unsqueeze(0).expand(M, -1, -1))
            else:
                xb = Xt[idx].unsqueeze(0).expand(M, -1, -1)
            if s.band_dropout > 0:
                xb = _drop_bands(xb, blank, ind, s.band_dropout, B, gen)
            loss = member_nll(model, xb, Ut[idx]).sum()
            if s.crps_weight > 0:
                loss = loss + s.crps_weight * member_crps(model, xb, Ut[idx]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() / M  # (with crps_weight: NLL + weighted CRPS)
            nb += 1
        model.eval()
        with torch.no_grad():
            v = float(ensemble_nll(model, Xv, Uv)) if len(Xv) else tot / nb
        sched.step(v) if s.schedule == "plateau" else sched.step()
        hist.append({"epoch": epoch, "train_nll": tot / nb, "val_nll": v, "lr": opt.param_groups[0]["lr"]})
        improved = v < best - 1e-4
        if improved:
            best, best_epoch, bad = v, epoch, 0
            best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        else:
            bad += 1
        if epoch == 1 or epoch % 5 == 0 or improved and epoch < 10:
            log(f"epoch {epoch:4d}  train NLL {tot / nb:8.4f}  val NLL {v:8.4f}  best {best:8.4f} (epoch {best_epoch})  "
                f"lr {opt.param_groups[0]['lr']:.1e}  {time.perf_counter() - t0:6.1f} s", )
        if bad >= s.patience:
            log(f"early stop at epoch {epoch}: no validation improvement for {s.patience} epochs")
            break
        if s.max_minutes and time.perf_counter() - t0 > 60 * s.max_minutes:
            log(f"stop at epoch {epoch}: wall-clock cap of {s.max_minutes} min")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    width = 1.0
    if s.calibrate and len(Xv) >= 50:
        width = calibrate_width(model, Xv, Uv)
        model.width.fill_(width)
        log(f"calibration: sigma width factor {width:.3f} (maximum likelihood on the {'hold-out catalogue' if use_hold else 'validation split'})")
    secs = time.perf_counter() - t0
    return TrainResult(model, norm, s, hist, epoch, best_epoch, secs, len(tr_idx), 0 if use_hold else len(Xv), width, va_idx)


class TorchFeatures:
    """:func:`workflows.photoz_data.features` in torch for fluxes (..., B) with errors and a usable
    mask: what the flux-noise augmentation rebuilds for every batch (same standardisation)."""

    def __init__(self, norm: dict[str, Any]):
        import torch

        soft = np.asarray(norm["softening_njy"], np.float64)
        mean = np.asarray(norm["feature_mean"], np.float64)
        std = np.asarray(norm["feature_std"], np.float64)
        B = len(soft)
        pairs = pzd.colour_pairs(norm["bands"])
        C = len(pairs)
        t = lambda a: torch.tensor(np.asarray(a, np.float64), dtype=torch.float32)  # noqa: E731
        self.B, self.C = B, C
        self.ii = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        self.jj = torch.tensor([j for _, j in pairs], dtype=torch.long)
        self.inv2s, self.s2x4, self.soft = t(0.5 / soft), t(4.0 * soft * soft), t(soft)
        self.a_mu, self.b_mu = t(-pzd.POGSON / std[:B]), t((pzd.NJY_ZEROPOINT - pzd.POGSON * np.log(soft) - mean[:B]) / std[:B])
        self.a_d, self.b_d = t(1.0 / std[B:2 * B]), t(-mean[B:2 * B] / std[B:2 * B])
        self.a_c, self.b_c = t(1.0 / std[2 * B:2 * B + C]), t(-mean[2 * B:2 * B + C] / std[2 * B:2 * B + C])
        self.mu0 = t(pzd.NJY_ZEROPOINT - pzd.POGSON * np.log(soft))

    def __call__(self, f, e, ok):
        import torch

        okf = ok.to(f.dtype)
        f = f * okf
        e = torch.where(ok, e, self.soft)
        ash = torch.asinh(f * self.inv2s)
        parts = [(ash * self.a_mu + self.b_mu) * okf,
                 (torch.log10(torch.clamp(pzd.POGSON * e / torch.sqrt(f * f + self.s2x4), min=1e-4)) * self.a_d + self.b_d) * okf]
        if self.C:
            mu = self.mu0 - pzd.POGSON * ash
            okc = (ok[..., self.ii] & ok[..., self.jj]).to(f.dtype)
            parts.append(((mu[..., self.ii] - mu[..., self.jj]) * self.a_c + self.b_c) * okc)
        parts.append(1.0 - okf)
        return torch.cat(parts, dim=-1)


def _drop_bands(xb, blank, ind, frac, B, gen):
    """Blank a random subset of bands (1 .. B-2 of them) in ``frac`` of the rows, per member."""
    import torch

    M, N, _ = xb.shape
    hit = torch.rand(M, N, 1, generator=gen) < frac
    n_drop = torch.randint(1, max(2, B - 1), (M, N, 1), generator=gen)
    rank = torch.argsort(torch.rand(M, N, B, generator=gen), dim=-1)
    drop = ((rank < n_drop) & hit).float()                 # (M, N, B)
    zero = torch.clamp(drop @ blank, max=1.0)
    return xb * (1.0 - zero) + drop @ ind


def calibrate_width(model, Xv, Uv) -> float:
    """The sigma width factor that maximises the ensemble likelihood of the validation split."""
    import torch

    lo, hi = math.log(0.5), math.log(2.5)
    g = (math.sqrt(5) - 1) / 2
    with torch.no_grad():
        f = lambda lw: float(ensemble_nll(model, Xv, Uv, width=math.exp(lw)))  # noqa: E731
        a, b = lo, hi
        c, d = b - g * (b - a), a + g * (b - a)
        fc, fd = f(c), f(d)
        for _ in range(30):
            if fc < fd:
                b, d, fd = d, c, fc
                c = b - g * (b - a)
                fc = f(c)
            else:
                a, c, fc = c, d, fd
                d = a + g * (b - a)
                fd = f(d)
    return round(math.exp(0.5 * (a + b)), 4)


# ---------------------------------------------------------------------------- export + card
def export(result: TrainResult, out_dir: str | Path, *, holdout: pzd.Photometry | None, holdout_label: str,
           training_info: dict[str, Any], pipeline_flux_kind: str = "kron", log: Any = print,
           throughput_n: int = 20000):
    """ONNX export, ONNX-vs-torch check on fresh inputs, hold-out metrics, throughput, card."""
    import torch

    from stages.photoz import summarise
    from workflows.bench.photoz import pdf_metrics, point_metrics
    from workflows.train.onnx_export import export_onnx, finish_model, max_abs_diff_onnx_torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, s, norm = result.model, result.settings, result.norm
    F = len(norm["features"])
    onnx_path = out_dir / "model.onnx"
    export_onnx(model, (torch.zeros(8, F),), onnx_path, input_names=["features"],
                output_names=["prob", "weight", "mu", "sigma", "cdf"],
                dynamic_axes={"features": {0: "n"}, "prob": {0: "n"}, "weight": {0: "n"}, "mu": {0: "n"}, "sigma": {0: "n"},
                              "cdf": {0: "n"}})
    rng = np.random.default_rng(s.seed + 1)
    fresh = rng.normal(0, 1, (512, F)).astype(np.float32)
    fresh[:, -len(norm["bands"]):] = (rng.random((512, len(norm["bands"]))) < 0.1).astype(np.float32)
    diff = max_abs_diff_onnx_torch(model, onnx_path, {"features": fresh})
    log(f"export: {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB), max |onnxruntime - torch| = {diff:.2e} on 512 fresh inputs")
    edges = s.edges
    centres = 0.5 * (edges[1:] + edges[:-1])
    metrics: dict[str, Any] = {"onnx_vs_torch_max_abs_diff": diff}
    if holdout is not None and len(holdout):
        pred = predict_onnx(onnx_path, holdout, norm)
        pdf = pred["prob"] / s.dz
        summ = summarise(pdf, centres, s.dz)
        pm = point_metrics(summ["photoz_median"], holdout.z)
        dm = pdf_metrics(pdf, centres, s.dz, holdout.z, summ)
        metrics.update({"holdout": holdout_label, "n_holdout": int(len(holdout)), "point_estimate": "photoz_median",
                        **{k: (round(float(v), 5) if np.isscalar(v) else v) for k, v in {**pm, **dm}.items()}})
        log("hold-out metrics (" + holdout_label + "): " + ", ".join(f"{k} {v}" for k, v in metrics.items()
                                                                       if isinstance(v, float)))
    tp = throughput(onnx_path, model, F, n=throughput_n)
    metrics.update({k: round(v, 1) for k, v in tp.items()})
    log("throughput (1 thread, objects per CPU-second): " + ", ".join(f"{k} {v:.0f}" for k, v in tp.items()))
    card = finish_model(
        out_dir, onnx_path, name=MODEL_NAME, version=MODEL_VERSION,
        inputs={"features": {"shape": ["n", F], "dtype": "float32",
                             "meaning": "standardised photo-z features, see normalisation.features and workflows.photoz_data.features"}},
        outputs={"prob": {"shape": ["n", len(centres)], "meaning": "probability of each z_grid bin (sum 1); density = prob / dz"},
                 "weight": {"shape": ["n", s.members * s.components], "meaning": "mixture weights (all members, sum 1)"},
                 "mu": {"shape": ["n", s.members * s.components], "meaning": "component means in u = ln(1+z)"},
                 "sigma": {"shape": ["n", s.members * s.components], "meaning": "component sigmas in u (calibrated)"},
                 "cdf": {"shape": ["n", len(centres) + 1], "meaning": "CDF at the z_grid bin edges (0 at the first, 1 at the last); "
                                                                     "diff(cdf) = prob up to rounding"}},
        bands=list(norm["bands"]),
        normalisation={**norm, "pipeline_flux_kind": pipeline_flux_kind,
                       "pipeline_columns": pipeline_columns(norm["bands"], pipeline_flux_kind),
                       "missing_bands": "flux or error NaN/inf or error <= 0: band missing (indicator 1, its features 0)",
                       "nondetections": "flux 0 +- the catalogue's limit; measured negative fluxes are used as they are"},
        training={**training_info, "seed": s.seed, "n_train": result.n_train, "n_validation_split": result.n_val,
                  "epochs_run": result.epochs, "best_epoch": result.best_epoch, "seconds": round(result.seconds, 1),
                  "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
                  "sigma_width_factor": result.width,
                  "model": f"deep ensemble of {s.members} mixture density networks, {s.components} Gaussians each in ln(1+z)",
                  "code": "workflows/train/photoz.py"},
        metrics=metrics,
        z_grid={"z_min": s.z_min, "z_max": s.z_max, "dz": s.dz, "n": int(len(centres)), "centres": [round(float(c), 6) for c in centres],
                "pdf": "density per unit z on the bin centres; integrated over each bin; sum(pdf)*dz = 1"},
    )
    torch.save(model.state_dict(), out_dir / "torch_state.pt")  # the exported torch model (bench, fine-tuning)
    _write_readme(out_dir, card)
    return card


def predict_onnx(onnx_path: Path, phot: pzd.Photometry, norm: dict[str, Any], batch: int = 256) -> dict[str, np.ndarray]:
    from pipeline.onnx import run_batched, session

    x = pzd.features(phot.reorder(norm["bands"]).flux, phot.reorder(norm["bands"]).err, norm)
    sess = session(onnx_path, device="cpu")
    prob, w, mu, sigma = run_batched(sess, {"features": x}, batch=batch, outputs=["prob", "weight", "mu", "sigma"])
    return {"prob": prob, "weight": w, "mu": mu, "sigma": sigma}


def throughput(onnx_path: Path, model: Any, n_features: int, n: int = 20000, batch: int | None = None) -> dict[str, float]:
    """Objects/s on one thread: ONNX Runtime vs the torch model, full p(z) and the mixture alone
    (batches of the stage's size)."""
    import onnxruntime as ort
    import torch

    from stages.photoz import BATCH

    batch = batch or BATCH

    from workflows.bench.photoz import tput  # objects per CPU-second: per core, robust to a shared machine

    torch.set_num_threads(1)
    x = np.random.default_rng(0).normal(0, 1, (n, n_features)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])

    def run_ort():
        for i in range(0, n, batch):
            sess.run(None, {"features": x[i:i + batch]})

    xt = torch.from_numpy(x)

    def run_torch():
        with torch.no_grad():
            for i in range(0, n, batch):
                model(xt[i:i + batch])

    def run_torch_mix():
        with torch.no_grad():
            for i in range(0, n, batch):
                model.mixture(xt[i:i + batch])

    run_ort()
    return {"throughput_onnx_pdf_obj_per_s": tput(run_ort, n), "throughput_torch_pdf_obj_per_s": tput(run_torch, n),
            "throughput_torch_mixture_only_obj_per_s": tput(run_torch_mix, n)}


def _write_readme(out_dir: Path, card: Any) -> None:
    m = card.metrics
    t = card.training
    lines = [f"# photo-z model `{card.name}` v{card.version}", "",
             f"Deep ensemble of {t['settings']['members']} mixture density networks "
             f"({t['settings']['components']} Gaussians in ln(1+z) each, hidden layers {t['settings']['hidden']}), "
             "trained by likelihood in PyTorch and exported to ONNX; p(z) is evaluated in the ONNX graph on a "
             f"grid z = {card.z_grid['z_min']}..{card.z_grid['z_max']} (dz = {card.z_grid['dz']}, {card.z_grid['n']} bins).", "",
             f"- bands: {', '.join(card.bands)}; pipeline columns (nJy): "
             + ", ".join(f"`{c['flux']}`" for c in card.normalisation["pipeline_columns"].values()) + " and their `...Err`",
             f"- training data: {t.get('catalog', '?')} ({t['n_train']} rows"
             + (f"; early stopping and calibration on the hold-out {t.get('holdout_catalog', 'catalogue')})"
                if t['settings'].get('early_stop') == "holdout" and not t['n_validation_split']
                else f" + {t['n_validation_split']} early-stopping rows)") + f", seed {t['seed']}",
             f"- epochs {t['epochs_run']} (best {t['best_epoch']}), {t['seconds']} s, sigma width factor {t['sigma_width_factor']}",
             f"- sha256 of model.onnx: `{card.sha256}`", "", "## Hold-out metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m.items()]
    lines += ["", f"Retrain: `{t.get('command', '')}`. Everything else (inputs, normalisation, grid centres, "
              "settings) is in `card.json`; `torch_state.pt` is the PyTorch model the ONNX file was exported from.", ""]
    (out_dir / "README.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="surveypipe train photoz", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data")
    src.add_argument("--catalog", help="training catalogue (FITS, Parquet or HDF5) with redshifts")
    src.add_argument("--mock", action="store_true", help="build the mock survey's own catalogues (simulate + pipeline + match)")
    src.add_argument("--mock-source", choices=["pipeline", "library"], default="pipeline",
                     help="mock: measured pipeline photometry (default) or the SED-library fallback without images")
    src.add_argument("--train-seeds", default=DEFAULT_TRAIN_SEEDS, help="mock: training release seeds (1000-1999)")
    src.add_argument("--val-seeds", default=DEFAULT_VAL_SEEDS, help="mock: validation release seeds (2000-2999) for the card metrics")
    src.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="mock: where the mock catalogues are built and cached")
    src.add_argument("--flux-kind", default=None,
                     help="pipeline flux kind(s) of {band}_{kind}Flux: --mock trains on them (comma-separated: "
                          f"several sets per band; default {DEFAULT_FLUX_KINDS}); with --catalog, the kind the "
                          "pipeline stage feeds to the model's plain band names (default kron)"),
    src.add_argument("--val-catalog", help="optional separate hold-out catalogue for the card metrics (same mapping)")
    src.add_argument("--mapping", help="column mapping YAML (id, redshift, bands, nondetection)")
    src.add_argument("--id", dest="id_col", help="id column (instead of --mapping)")
    src.add_argument("--redshift", help="redshift column (instead of --mapping)")
    src.add_argument("--band", action="append", default=[], metavar="B:mag|flux:COL:ERR[:UNIT]",
                     help="one band's columns (repeat; instead of --mapping)")
    src.add_argument("--nondetection", default=None, help="'mag=99', 'nan', 'flux_le=0' or 'none' (instead of --mapping)")
    src.add_argument("--hdf5-key", default=None, help="HDF5 group/dataset holding the table")
    p.add_argument("--out", required=True, help="model directory to write (model.onnx, card.json, README.md)")
    d = TrainSettings()
    g = p.add_argument_group("model and training")
    g.add_argument("--members", type=int, default=d.members)
    g.add_argument("--components", type=int, default=d.components)
    g.add_argument("--hidden", default=",".join(map(str, d.hidden)), help="hidden layer widths, e.g. 128,128,128")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--patience", type=int, default=d.patience, help="early stopping patience (epochs)")
    g.add_argument("--batch", type=int, default=d.batch)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--val-frac", type=float, default=d.val_frac, help="validation split carved from the training catalogue")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--band-dropout", type=float, default=d.band_dropout)
    g.add_argument("--crps-weight", type=float, default=d.crps_weight, help="loss = NLL + this x CRPS (in ln(1+z))")
    g.add_argument("--flux-noise", type=float, default=d.flux_noise,
                   help="input-noise augmentation: each batch redraws measured fluxes as f + this x err x N(0,1) (0: off)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout after every hidden layer")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--schedule", choices=["plateau", "cosine"], default=d.schedule,
                   help="learning rate: halve on a validation plateau, or cosine decay over --epochs")
    g.add_argument("--zmax", type=float, default=d.z_max)
    g.add_argument("--dz", type=float, default=d.dz)
    g.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    g.add_argument("--max-minutes", type=float, default=0.0, help="wall-clock cap on the epochs (0: none)")
    g.add_argument("--no-calibrate", action="store_true", help="skip the sigma width calibration")
    g.add_argument("--early-stop", choices=["split", "holdout"], default=None,
                   help="split: carve --val-frac of the training rows for early stopping and calibration; holdout: "
                        "train on every training row, early-stop and calibrate on the hold-out catalogue "
                        "(default: holdout with --mock, whose validation seeds are a separate catalogue; else split)")
    g.add_argument("--throughput-n", type=int, default=20000, help="objects timed for the card's throughput figures")
    return p


def mapping_from_args(a: argparse.Namespace, need_redshift: bool) -> pzd.ColumnMapping:
    if a.mapping:
        if a.band or a.id_col or a.redshift:
            raise pzd.MappingError("give either --mapping or --band/--id/--redshift flags, not both")
        return pzd.ColumnMapping.from_yaml(a.mapping)
    if not a.band:
        raise pzd.MappingError("no columns: give --mapping MAPPING.yaml or --band B:mag|flux:COL:ERR (repeat)")
    return pzd.ColumnMapping.from_flags(id=a.id_col, redshift=a.redshift, bands=a.band, nondetection=a.nondetection)


def settings_from_args(a: argparse.Namespace) -> TrainSettings:
    return TrainSettings(members=a.members, components=a.components, hidden=tuple(int(h) for h in a.hidden.split(",")),
                         epochs=a.epochs, patience=a.patience, batch=a.batch, lr=a.lr, val_frac=a.val_frac, seed=a.seed,
                         band_dropout=a.band_dropout, crps_weight=a.crps_weight, z_max=a.zmax, dz=a.dz, threads=a.threads,
                         calibrate=not a.no_calibrate, max_minutes=a.max_minutes, flux_noise=a.flux_noise,
                         dropout=a.dropout, weight_decay=a.weight_decay, schedule=a.schedule,
                         early_stop=a.early_stop or ("holdout" if getattr(a, "mock", False) else "split"))


def mock_catalogs(workdir: str | Path, train_seeds: str, val_seeds: str, source: str = "pipeline",
                  log: Any = print) -> tuple[Path, Path]:
    """Build (or reuse) the mock training and validation catalogues."""
    from workflows.mock.seeds import check_seed

    for s_ in pzd._seed_list(train_seeds):
        check_seed(s_, "training")
    for s_ in pzd._seed_list(val_seeds):
        check_seed(s_, "validation")
    workdir = Path(workdir)
    tag = "" if source == "pipeline" else f"_{source}"
    tr = cached_or_build(train_seeds, workdir / f"train_{train_seeds}{tag}.parquet", workdir, source, log)
    va = cached_or_build(val_seeds, workdir / f"validation_{val_seeds}{tag}.parquet", workdir, source, log)
    return tr, va


def cached_or_build(seeds: str, path: Path, workdir: Path, source: str, log: Any = print) -> Path:
    """A cached mock catalogue is used as it is, whatever pipeline version measured it (the output
    says so when its pipeline fingerprint differs from the current code's); a missing one is built,
    ``SURVEYPIPE_SIM_JOBS`` seeds at a time (default: 2, or 1 on a one-core machine)."""
    if path.exists():
        got = pzd.table_meta(path).get("pipeline_fingerprint")
        now = pzd.pipeline_fingerprint() if source == "pipeline" else None
        note = "" if got == now else (f"; NOTE: measured by pipeline fingerprint {got}, the current classical stages "
                                      f"are {now} -- cached catalogue used regardless (delete it to rebuild)")
        log(f"mock catalogue {path}: cached{note}")
        return path
    jobs = int(os.environ.get("SURVEYPIPE_SIM_JOBS", min(2, os.cpu_count() or 1)))
    return pzd.build_mock_catalog(seeds, path, workdir=workdir / "work", source=source, log=log, jobs=jobs)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    s = settings_from_args(a)
    if a.flux_kind is None:
        a.flux_kind = DEFAULT_FLUX_KINDS if a.mock else "kron"
    os.environ.setdefault("OMP_NUM_THREADS", str(s.threads))
    try:
        if a.mock:
            if a.catalog:
                raise pzd.MappingError("give either --catalog or --mock")
            tr_path, va_path = mock_catalogs(a.workdir, a.train_seeds, a.val_seeds, a.mock_source, log)
            mapping = pzd.mock_mapping(kind=a.flux_kind)
            catalog, val_catalog = tr_path, va_path
            meta = pzd.table_meta(tr_path)
            info = {"pipeline_fingerprint": meta.get("pipeline_fingerprint"),
                    "catalog": f"mock survey ({a.mock_source}): training seeds {a.train_seeds}, "
                               f"{'measured pipeline photometry matched to truth' if a.mock_source == 'pipeline' else 'SED library + Kron noise model (no images)'}",
                    "holdout_catalog": f"validation seeds {a.val_seeds}", "flux_kind": a.flux_kind}
        else:
            if not a.catalog:
                raise pzd.MappingError("give --catalog FILE (or --mock)")
            mapping = mapping_from_args(a, need_redshift=True)
            catalog, val_catalog = Path(a.catalog), Path(a.val_catalog) if a.val_catalog else None
            info = {"catalog": str(catalog), "mapping": mapping.to_dict()}
        phot = pzd.load_catalog(catalog, mapping, need_redshift=True, hdf5_key=a.hdf5_key)
        hold = pzd.load_catalog(val_catalog, mapping, need_redshift=True, hdf5_key=a.hdf5_key) if val_catalog else None
    except pzd.MappingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info["command"] = "surveypipe train photoz " + " ".join(argv if argv is not None else sys.argv[1:])
    res = train(phot, s, log=log, holdout=hold)
    if hold is None:
        hold_label = f"validation split carved from the training catalogue ({res.n_val} rows, also used for early stopping)"
        hold_phot = phot_for_split(phot, res, s)
    else:
        hold_label = f"separate hold-out catalogue {info.get('holdout_catalog', str(val_catalog))}"
        if s.early_stop == "holdout":
            hold_label += " (also used for early stopping and the sigma width calibration)"
        hold_phot = hold
    export(res, a.out, holdout=hold_phot, holdout_label=hold_label, training_info=info,
           pipeline_flux_kind=a.flux_kind, log=log, throughput_n=a.throughput_n)
    print(f"wrote {Path(a.out) / 'card.json'}")
    return 0


def phot_for_split(phot: pzd.Photometry, res: TrainResult, s: TrainSettings) -> pzd.Photometry:
    """The rows of the automatic validation split (same filtering and permutation as :func:`train`)."""
    ok = np.isfinite(phot.z) & (phot.z >= s.z_min) & (phot.z < s.z_max)
    p = phot.take(np.flatnonzero(ok))
    usable = (p.status != pzd.MISSING).sum(axis=1) >= 2
    p = p.take(np.flatnonzero(usable))
    return p.take(res.val_idx)


if __name__ == "__main__":
    sys.exit(main())
